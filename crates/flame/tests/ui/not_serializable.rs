struct Frame {
    pixels: Vec<u8>,
}

#[flame::remote]
async fn brightness(frame: Frame) -> u8 {
    frame.pixels.first().copied().unwrap_or(0)
}

fn main() {}
