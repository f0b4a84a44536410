#[flame::remote]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

async fn run(pool: flame::Pool) {
    let _ = flame::call!(pool, add("one", 2)).await;
}

fn main() {}
