//! `fp4 serve`: the OpenAI-compatible server, accepting the vLLM flags of the user's recipe.

use super::ComputeArgs;
use anyhow::{bail, Context};
use fp4_chat::{ChatTemplate, Tokenizer};
use fp4_format::Checkpoint;
use fp4_model::{LoadOptions, Qwen35};
use fp4_server::engine::{self, EngineConfig, Event, GenRequest, Penalties};
use fp4_server::{AppState, ServerConfig};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (also as the positional `fp4 serve DIR`, like `vllm serve`).
    #[arg(long, required_unless_present = "model_pos")]
    model: Option<PathBuf>,
    #[arg(conflicts_with = "model", value_name = "MODEL")]
    model_pos: Option<PathBuf>,
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Name clients use in `model` (default: the model path as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Context length (prompt + output); default: the model's max_position_embeddings.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Sequences computed concurrently.
    #[arg(long, default_value_t = 16)]
    max_num_seqs: usize,
    /// Prompt tokens a prefilling request computes per scheduler step (vLLM's flag; here the
    /// chunk of one request's prompt between decode steps): larger gives a long prompt its
    /// first token sooner, smaller stalls the running requests' decode less.
    #[arg(long, default_value_t = fp4_server::engine::PREFILL_CHUNK as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_num_batched_tokens: u32,
    /// Requests allowed to wait for a slot; more get HTTP 429.
    #[arg(long, default_value_t = 64)]
    max_waiting_requests: usize,
    /// Bytes for all sequences' caches (KV + GDN state), e.g. 2GiB or 512MiB: GDN state slots
    /// for --max-num-seqs sequences, the rest paged KV blocks, less the prefix cache's share.
    #[arg(long, default_value = "2GiB")]
    cache_budget: String,
    /// Keep each prompt's state (KV and GDN state) so that a later prompt starting with it (the
    /// next turn of a conversation) prefills only the rest (vLLM's flag; on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    enable_prefix_caching: bool,
    #[arg(long, overrides_with = "enable_prefix_caching")]
    no_enable_prefix_caching: bool,
    /// Bytes of --cache-budget set aside for prefix-cache snapshots (default: a quarter of it),
    /// least recently used first out.
    #[arg(long)]
    prefix_cache_budget: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "FP4_API_KEY")]
    api_key: Option<String>,
    /// Only `qwen3` exists.
    #[arg(long)]
    reasoning_parser: Option<String>,
    #[arg(long)]
    enable_auto_tool_choice: bool,
    /// Let special-token strings typed inside chat messages (`<|im_start|>`, `<|endoftext|>`)
    /// act as the special tokens. Off (the default), they are tokenized as ordinary text, so a
    /// user cannot open or close turns through the content; raw `/v1/completions` prompts are
    /// tokenized as given either way.
    #[arg(long)]
    special_tokens_in_content: bool,
    /// Only `qwen3_coder` exists.
    #[arg(long)]
    tool_call_parser: Option<String>,
    /// Chat template file (Jinja) to use instead of the model directory's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// JSON object merged under each request's chat_template_kwargs, e.g. '{"enable_thinking": false}'.
    #[arg(long)]
    default_chat_template_kwargs: Option<String>,
    /// Checked against the checkpoint (modelopt or compressed-tensors NVFP4).
    #[arg(long)]
    quantization: Option<String>,
    /// Run every decode step eagerly instead of replaying CUDA graphs (vLLM's flag; graphs are
    /// on by default on the GPU and never used on the CPU).
    #[arg(long)]
    enforce_eager: bool,
    /// Speculative decoding with the checkpoint's MTP head, as vLLM spells it:
    /// '{"method": "mtp", "num_speculative_tokens": K}'. Every request drafts K tokens per step
    /// and keeps exactly the tokens (greedy) or the distribution (sampled) it would get without.
    /// fp4's optional "draft_head": "nvfp4" (default on the GPU: drafting reads NVFP4, the MTP
    /// head's linears and a copy of a BF16 LM head) or "model" (the weights as loaded).
    #[arg(long)]
    speculative_config: Option<String>,
    #[arg(long)]
    language_model_only: bool,
    #[arg(long)]
    gpu_memory_utilization: Option<f32>,
    #[arg(long)]
    trust_remote_code: bool,
    /// Seconds a client has to send a request's headers (also the longest a kept-alive connection
    /// may sit idle); slower connections are closed.
    #[arg(long, default_value_t = 10)]
    header_read_timeout: u64,
    /// Seconds a client has to send a request's body once its headers are in (else 408).
    #[arg(long, default_value_t = 30)]
    body_read_timeout: u64,
    /// Open connections served at once; further ones are closed on accept until one ends.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Shut down when standard input reaches end of file: a parent (`fp4 loop`) holds the pipe,
    /// so the server ends with it even when the parent is killed outright.
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// "2GiB", "512MiB", "1000000" → bytes.
fn parse_bytes(s: &str) -> anyhow::Result<usize> {
    let t = s.trim();
    let (num, mult) =
        [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("GB", 1_000_000_000), ("MB", 1_000_000)]
            .iter()
            .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim(), *m)))
            .unwrap_or((t, 1));
    let v: f64 = num.parse().with_context(|| format!("--cache-budget: `{s}` is not a size like 2GiB"))?;
    anyhow::ensure!(v > 0.0, "--cache-budget must be positive");
    Ok((v * mult as f64) as usize)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let model_path = a.model.clone().or(a.model_pos.clone()).expect("clap requires a model");
    if let Some(r) = &a.reasoning_parser {
        if r != "qwen3" {
            bail!("--reasoning-parser {r} is not available; fp4 implements `qwen3`");
        }
    }
    if let Some(t) = &a.tool_call_parser {
        if t != "qwen3_coder" && t != "qwen3_xml" {
            bail!("--tool-call-parser {t} is not available; fp4 implements `qwen3_coder`");
        }
    }
    if a.enable_auto_tool_choice && a.tool_call_parser.is_none() {
        bail!("--enable-auto-tool-choice needs --tool-call-parser qwen3_coder");
    }
    for (set, flag) in [
        (a.language_model_only, "--language-model-only"),
        (a.gpu_memory_utilization.is_some(), "--gpu-memory-utilization"),
        (a.trust_remote_code, "--trust-remote-code"),
    ] {
        if set {
            tracing::info!("{flag} accepted; it does not change anything for fp4's CPU engine (text model only, explicit --cache-budget)");
        }
    }
    anyhow::ensure!(a.max_num_seqs >= 1, "--max-num-seqs must be at least 1");
    anyhow::ensure!(a.max_waiting_requests >= 1, "--max-waiting-requests must be at least 1");
    anyhow::ensure!(a.header_read_timeout >= 1, "--header-read-timeout must be at least 1 second");
    anyhow::ensure!(a.max_connections >= 1, "--max-connections must be at least 1");
    anyhow::ensure!(a.body_read_timeout >= 1, "--body-read-timeout must be at least 1 second");
    // Listen first: a port in use is reported before minutes of model loading.
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    listener.set_nonblocking(true)?;
    let ckpt = Checkpoint::open(&model_path).with_context(|| format!("cannot open model {}", model_path.display()))?;
    if let Some(q) = &a.quantization {
        match (q.as_str(), &ckpt.quant) {
            ("modelopt" | "modelopt_fp4" | "compressed-tensors", Some(_)) => {}
            ("modelopt" | "modelopt_fp4" | "compressed-tensors", None) => {
                bail!("--quantization {q}: {} has no quantization config", model_path.display())
            }
            (other, _) => {
                bail!("--quantization {other} is not supported; fp4 reads modelopt and compressed-tensors NVFP4")
            }
        }
    }
    let tokenizer = Tokenizer::from_dir(&model_path)?.with_context(|| {
        format!("{} has no {}; fp4 serve needs the model's tokenizer", model_path.display(), Tokenizer::FILE)
    })?;
    let template = match &a.chat_template {
        Some(path) => {
            let src = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --chat-template {}", path.display()))?;
            ChatTemplate::new(&src).with_context(|| format!("--chat-template {}", path.display()))?
        }
        None => ChatTemplate::from_dir(&model_path, true).with_context(|| {
            format!("{}: fp4 serve needs the model's chat template (or --chat-template FILE)", model_path.display())
        })?,
    };
    let default_kwargs: Map<String, Value> = match &a.default_chat_template_kwargs {
        Some(s) => serde_json::from_str(s).context("--default-chat-template-kwargs must be a JSON object")?,
        None => Map::new(),
    };
    let positions = ckpt.config.max_position_embeddings;
    if let Some(n) = a.max_model_len {
        anyhow::ensure!(
            n <= positions,
            "--max-model-len {n} exceeds the model's max_position_embeddings ({positions})"
        );
    }
    let max_model_len = a.max_model_len.unwrap_or(positions);
    anyhow::ensure!(max_model_len >= 2, "--max-model-len must be at least 2");
    let cache_budget = parse_bytes(&a.cache_budget)?;
    // With overrides_with, the later of the two flags is the one set.
    let prefix_caching = a.enable_prefix_caching || !a.no_enable_prefix_caching;
    let prefix_cache_bytes = if !prefix_caching {
        0
    } else {
        match &a.prefix_cache_budget {
            Some(b) => parse_bytes(b).with_context(|| format!("--prefix-cache-budget {b}"))?,
            None => cache_budget / 4,
        }
    };
    anyhow::ensure!(
        prefix_cache_bytes < cache_budget,
        "--prefix-cache-budget ({prefix_cache_bytes} bytes) must leave room in --cache-budget ({cache_budget} bytes) for the running sequences"
    );
    let speculative = match &a.speculative_config {
        Some(json) => {
            Some(fp4_model::SpeculativeConfig::parse(json).map_err(|e| anyhow::anyhow!("--speculative-config: {e}"))?)
        }
        None => None,
    };
    let started = std::time::Instant::now();
    let opts: LoadOptions = a.compute.load_options()?;
    let model = Qwen35::load(&ckpt, opts).with_context(|| format!("cannot load model {}", model_path.display()))?;
    let head = match speculative {
        Some(spec) => {
            let mut head = fp4_model::Mtp::load(&ckpt, opts)
                .with_context(|| format!("--speculative-config: cannot load the MTP head of {}", model_path.display()))?
                .with_context(|| {
                    format!(
                        "--speculative-config asks for MTP, but {} has no MTP head (no mtp.* tensors)",
                        model_path.display()
                    )
                })?;
            if spec.nvfp4_draft_head_on(model.device) {
                let copy = head.quantize_for_drafting(&model);
                let lm_head = if copy { "an NVFP4 copy of the LM head" } else { "the model's own LM head" };
                let copy_bytes = head.draft_head_bytes();
                tracing::info!(copy_bytes, "MTP drafting reads NVFP4: the head's own linears, and {lm_head}");
            }
            Some(head)
        }
        None => None,
    };
    let vocab_size = model.config.vocab_size;
    let eos_ids = ckpt.eos_token_ids.clone();
    let one_seq = engine::cache_bytes(&model, max_model_len);
    // A snapshot holds at least a sequence's GDN state: a smaller prefix-cache share could keep
    // none, so it goes back to the running sequences.
    let smallest_snapshot = fp4_model::Pools::slot_bytes(&model.config, false);
    let prefix_cache_bytes = if prefix_cache_bytes > 0 && prefix_cache_bytes < smallest_snapshot {
        tracing::warn!(
            "prefix caching is off: its share of the cache budget ({prefix_cache_bytes} bytes, --prefix-cache-budget) \
             cannot hold one snapshot (a sequence's GDN state alone is {smallest_snapshot} bytes)"
        );
        0
    } else {
        prefix_cache_bytes
    };
    tracing::info!(
        secs = started.elapsed().as_secs_f64(),
        cache_budget,
        bytes_per_full_sequence = one_seq,
        "model loaded"
    );
    let engine = engine::start_with_head(
        model,
        head,
        EngineConfig {
            max_num_seqs: a.max_num_seqs,
            max_model_len,
            max_waiting: a.max_waiting_requests,
            cache_budget_bytes: cache_budget,
            cuda_graphs: !a.enforce_eager,
            prefix_cache_bytes,
            spec_tokens: speculative.map_or(0, |c| c.num_speculative_tokens),
            prefill_chunk: a.max_num_batched_tokens as usize,
        },
    )
    .with_context(|| format!("--cache-budget {} with --max-num-seqs {}", a.cache_budget, a.max_num_seqs))?;
    let state = Arc::new(AppState {
        engine,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        cfg: ServerConfig {
            served_model_name: a.served_model_name.clone().unwrap_or_else(|| model_path.display().to_string()),
            max_model_len,
            api_key: a.api_key.clone(),
            default_chat_template_kwargs: default_kwargs,
            reasoning_parser: a.reasoning_parser.is_some(),
            tool_parser: a.enable_auto_tool_choice,
            special_tokens_in_content: a.special_tokens_in_content,
            body_read_timeout: std::time::Duration::from_secs(a.body_read_timeout),
            eos_ids,
        },
        metrics: Default::default(),
        ready: AtomicBool::new(false),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        vocab_size,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let limits = ConnLimits {
        header_read_timeout: std::time::Duration::from_secs(a.header_read_timeout),
        max_connections: a.max_connections,
    };
    rt.block_on(serve(state, listener, limits, a.shutdown_timeout, a.exit_on_stdin_eof))
}

/// What keeps slow or idle clients from holding the server.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    header_read_timeout: std::time::Duration,
    max_connections: usize,
}

/// Accepts connections and serves `app` on each (HTTP/1.1), closing a connection whose request
/// headers do not arrive within the timeout and refusing connections beyond the cap, until
/// `shutdown` resolves; then waits for the open connections to finish their requests.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept error: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(max = limits.max_connections, "connection refused: at the connection cap");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    graceful.shutdown().await;
}

async fn serve(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    limits: ConnLimits,
    shutdown_timeout: u64,
    exit_on_stdin_eof: bool,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    // Warm up before /health says ready: a prefill and one batched decode step (on the GPU this
    // captures the batch-1 CUDA graph, so the first request does not pay for it).
    let warm = GenRequest {
        prompt: vec![0],
        sampling: Default::default(),
        penalties: Penalties { repetition: 1.0, ..Default::default() },
        max_tokens: 2,
        stop_ids: vec![],
        logprobs: None,
        choices: vec![],
        snapshot_at: vec![],
    };
    let mut rx = state.engine.submit(warm)?;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Finished { .. } => break,
            Event::Failed(err) => bail!("warm-up failed: {err}"),
            Event::Token { .. } => {}
        }
    }
    state.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%addr, model = %state.cfg.served_model_name, "serving");
    eprintln!("fp4 serving {} on http://{addr}", state.cfg.served_model_name);
    let app = fp4_server::router(state.clone());
    let engine = state.engine.clone();
    let shutdown = async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                s.recv().await;
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        let stdin_closed = async {
            if !exit_on_stdin_eof {
                return std::future::pending::<()>().await;
            }
            // A plain thread, not spawn_blocking: the runtime must not wait for it on exit.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 256];
                while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
                let _ = tx.send(());
            });
            let _ = rx.await;
            tracing::info!("standard input closed (the parent process is gone)");
        };
        tokio::select! { _ = ctrl_c => {}, _ = term => {}, _ = stdin_closed => {} }
        tracing::info!("shutting down: draining in-flight requests");
        engine.shutdown();
        // Graceful shutdown returns once every connection is done; this bounds the wait.
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(shutdown_timeout)).await;
            tracing::warn!("shutdown timeout reached with requests still running; exiting");
            std::process::exit(1);
        });
    };
    serve_http(listener, app, limits, shutdown).await;
    Ok(())
}
