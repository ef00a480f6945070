//! Embeds texts with a running fleet and prints each fused vector's size and first values. The
//! request and its reply travel as MessagePack, the client's default.
//!
//! ```sh
//! embedfleet serve                      # prints: ... ready: nats=nats://127.0.0.1:PORT ...
//! cargo run --release -p embedfleet-client --example embed -- nats://127.0.0.1:PORT "hello" "world"
//! ```

use std::process::ExitCode;

use embedfleet_client::{ClientError, EmbedClient};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .or_else(|| std::env::var("NATS_URL").ok())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string());
    let mut texts: Vec<String> = args.collect();
    if texts.is_empty() {
        texts.push("hello".to_string());
    }

    match run(&url, &texts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(url: &str, texts: &[String]) -> Result<(), ClientError> {
    // One connection; the client is cheap to clone across tasks. It speaks MessagePack unless
    // given `.with_encoding(Encoding::Json)`.
    let client = EmbedClient::connect(url).await?;
    // One request with every text; the reply keeps their order.
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors = client.embed_texts(&texts).await?;
    for (text, vector) in texts.iter().zip(&vectors) {
        let head: Vec<String> = vector.iter().take(4).map(|x| format!("{x:+.4}")).collect();
        println!(
            "{text:?}: {} floats [{}, ...]",
            vector.len(),
            head.join(", ")
        );
    }
    Ok(())
}
