//! `skiff logs INSTANCE [-n NS] [--tail N] [-f]`: an instance's output,
//! which the API server reads from the instance's node.

use std::io::Write;

use clap::Args;
use http_body_util::BodyExt;

use crate::resources::{Connection, runtime};

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub instance: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<usize>,
    /// Keep printing what the instance writes.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[command(flatten)]
    pub connection: Connection,
}

pub fn run(args: &LogsArgs) -> anyhow::Result<u8> {
    let client = args.connection.client()?;
    runtime()?.block_on(async {
        let mut body = client
            .logs(&args.namespace, &args.instance, args.tail, args.follow)
            .await?;
        let mut out = std::io::stdout().lock();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                out.write_all(&data)?;
                out.flush()?;
            }
        }
        Ok(0)
    })
}
