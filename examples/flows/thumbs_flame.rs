//! The seed's first flow with flame: the thumbnails are cut on a runner,
//! which writes their rows through the app's own database pool (app
//! state, built in `main` in parent and runner alike). `diff
//! thumbs_local.rs thumbs_flame.rs` shows what flame adds.
//!
//!   DATABASE_URL=postgres://... cargo run -p flame-examples --example thumbs_flame VIDEO

use flame::{RemoteError, State};
use flame_examples::video::{create_schema, Db};
use tokio::process::Command;

#[flame::remote]
async fn thumbnails(State(db): State<Db>, video: String, every: u32) -> Result<u64, RemoteError> {
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
    let flame = flame::FlameBuilder::new().state(db.clone()).init().await?;
    let pool = flame.pool("thumbs").max(2).start().await?;
    create_schema(&*db.0.get().await?).await?;
    let video = std::env::args().nth(1).expect("usage: thumbs VIDEO");
    let rows = flame::call!(pool, thumbnails(video.clone(), 2)).await??;
    println!("{rows} thumbnails of {video}");
    Ok(())
}
