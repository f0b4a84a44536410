//! A [`Stream<Bytes>`](super::Stream) read as an `AsyncRead`: [`Reader`].

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

/// The chunks of a [`Stream<Bytes>`](super::Stream) as `Reader` reads them.
pub(crate) type ByteChunks =
    Pin<Box<dyn futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>>;

/// A [`Stream<Bytes>`](super::Stream) read as an `AsyncRead` (and `AsyncBufRead`): made
/// by [`Stream::into_reader`](super::Stream::into_reader).
pub struct Reader(tokio_util::io::StreamReader<ByteChunks, Bytes>);

impl Reader {
    /// Reads `chunks`.
    pub(crate) fn new(chunks: ByteChunks) -> Reader {
        Reader(tokio_util::io::StreamReader::new(chunks))
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reader")
    }
}

impl tokio::io::AsyncRead for Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncBufRead for Reader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().0).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.0).consume(amt)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::stream::Stream;
    use crate::Error;

    #[test]
    fn a_byte_stream_reads_as_an_async_read_with_its_error_last() {
        use tokio::io::AsyncReadExt;
        let chunks = vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
            Err("cut off"),
        ];
        let mut reader = Stream::try_new(futures::stream::iter(chunks)).into_reader();
        let (text, error) = futures::executor::block_on(async {
            let mut text = vec![0u8; 11];
            reader.read_exact(&mut text).await.unwrap();
            let error = reader.read_u8().await.unwrap_err();
            (text, error)
        });
        assert_eq!(text, b"hello world");
        assert_eq!(error.kind(), std::io::ErrorKind::Other);
        let inner = error.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert!(
            matches!(inner, Some(Error::Stream(m)) if m == "cut off"),
            "{error:?}"
        );
    }
}
