//! The seed's first flow, on one machine: cut thumbnails out of a video
//! with ffmpeg and write a row per thumbnail to the app's database.
//! `thumbs_flame.rs` is the same program with the work on a runner, which
//! uses the app's own database pool; `diff thumbs_local.rs
//! thumbs_flame.rs` shows what flame adds.
//!
//!   DATABASE_URL=postgres://... cargo run -p flame-examples --example thumbs_local VIDEO

use flame_examples::video::{create_schema, Db};
use tokio::process::Command;

async fn thumbnails(db: &Db, video: String, every: u32) -> anyhow::Result<u64> {
    let dir = tempfile::tempdir()?;
    let fps = format!("fps=1/{every}");
    let args = ["-loglevel", "error", "-i", &video, "-vf", &fps];
    let status = Command::new("ffmpeg")
        .args(args)
        .arg(dir.path().join("%02d.png"))
        .status()
        .await?;
    if !status.success() {
        return Err(std::io::Error::other(format!("ffmpeg failed on {video}: {status}")).into());
    }
    let client = db.0.get().await?;
    let mut rows = 0;
    for (i, png) in std::fs::read_dir(dir.path())?.enumerate() {
        let bytes = png?.metadata()?.len() as i32;
        let at_secs = i as i32 * every as i32;
        let made_by = std::process::id().to_string();
        let sql = "INSERT INTO thumbnails (video, at_secs, bytes, made_by) VALUES ($1, $2, $3, $4)";
        rows += client
            .execute(sql, &[&video, &at_secs, &bytes, &made_by])
            .await?;
    }
    Ok(rows)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = Db::connect(&std::env::var("DATABASE_URL")?)?;
    create_schema(&*db.0.get().await?).await?;
    let video = std::env::args().nth(1).expect("usage: thumbs VIDEO");
    let rows = thumbnails(&db, video.clone(), 2).await?;
    println!("{rows} thumbnails of {video}");
    Ok(())
}
