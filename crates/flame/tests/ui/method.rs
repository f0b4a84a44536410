struct Resizer;

impl Resizer {
    #[flame::remote]
    async fn resize(&self, width: u32) -> u32 {
        width
    }
}

fn main() {}
