#[flame::remote]
async fn identity<T>(value: T) -> T {
    value
}

fn main() {}
