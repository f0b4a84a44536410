// A variable used in an inline block but not listed is not silently shipped.
async fn run(pool: flame::Pool) {
    let listed = 2u32;
    let secret = 40u32;
    let _ = flame::call!(pool, |listed: u32| -> u32 { listed + secret }).await;
}

fn main() {}
