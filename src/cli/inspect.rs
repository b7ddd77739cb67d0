use anyhow::Context;
use fp4_format::{Checkpoint, LayerType, ModelLayout};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (config.json + safetensors).
    dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(&a.dir).with_context(|| format!("cannot open model {}", a.dir.display()))?;
    let c = &ckpt.config;
    let stats = ckpt.dtype_stats();
    let ignored = ckpt.names().filter(|n| n.starts_with("model.visual.") || n.starts_with("mtp.")).count();
    let layout = match c.layout {
        ModelLayout::VisionLanguage => "qwen3_5 (VL wrapper, text_config)",
        ModelLayout::TextOnly => "qwen3_5_text (flat)",
    };
    // Quantized linears by what their weights store.
    let (mut nvfp4, mut fp8) = (0usize, 0usize);
    for n in ckpt.names() {
        let weight = n.strip_suffix(".weight_packed").or_else(|| n.strip_suffix(".weight"));
        if let (Some(_), Ok(t)) = (weight, ckpt.tensor(n)) {
            match t.dtype {
                fp4_format::DType::U8 => nvfp4 += 1,
                fp4_format::DType::F8E4M3 => fp8 += 1,
                _ => {}
            }
        }
    }
    let unquantized = ckpt.quant.as_ref().map(|_| unquantized_linears(&ckpt));
    let quant = ckpt.quant.as_ref().map(|q| {
        format!("{} (from {}); {nvfp4} NVFP4 and {fp8} FP8 linear layers quantized", q.summary(), q.source().display())
    });
    if a.json {
        let v = serde_json::json!({
            "dir": a.dir,
            "layout": layout,
            "weight_prefix": ckpt.text_prefix,
            "files": ckpt.files().count(),
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "linear_attention_layers": c.num_layers_of(LayerType::LinearAttention),
            "full_attention_layers": c.num_layers_of(LayerType::FullAttention),
            "tie_word_embeddings": c.tie_word_embeddings,
            "eos_token_ids": ckpt.eos_token_ids,
            "dtypes": stats.iter().map(|(k, (n, b))| (k.clone(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "ignored_tensors": ignored,
            "quantization_config": c.quantization_config,
            "quantization": quant,
            "nvfp4_layers": nvfp4,
            "fp8_layers": fp8,
            "unquantized_linears": unquantized.as_ref().map(|u| &u.names),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model        {}", a.dir.display());
    println!("layout       {layout}; weights under `{}`; {} file(s)", ckpt.text_prefix, ckpt.files().count());
    println!(
        "shape        hidden {} · ffn {} · vocab {} · {} layers ({} Gated DeltaNet + {} full attention)",
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_hidden_layers,
        c.num_layers_of(LayerType::LinearAttention),
        c.num_layers_of(LayerType::FullAttention)
    );
    println!(
        "attention    {} q / {} kv heads × {} (rotary {}, θ {})",
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.rotary_dim(),
        c.rope_theta
    );
    println!(
        "deltanet     {} k heads × {} / {} v heads × {}, conv {}",
        c.linear_num_key_heads,
        c.linear_key_head_dim,
        c.linear_num_value_heads,
        c.linear_value_head_dim,
        c.linear_conv_kernel_dim
    );
    let layers: String = c.layer_types.iter().map(|t| if *t == LayerType::FullAttention { 'A' } else { 'L' }).collect();
    println!("layers       {layers}  (L = Gated DeltaNet, A = full attention)");
    println!("embeddings   {}", if c.tie_word_embeddings { "tied" } else { "separate lm_head" });
    println!("stop ids     {:?}", ckpt.eos_token_ids);
    println!("tensors      {} in all; {ignored} vision/MTP tensors ignored", ckpt.names().count());
    for (dtype, (n, bytes)) in &stats {
        println!("  {dtype:<8} {n:>6} tensors {:>12.3} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    println!("quantization {}", quant.as_deref().unwrap_or("none"));
    if let Some(u) = &unquantized {
        println!("unquantized  {} linear layers kept in {}", u.names.len(), u.dtypes.join("/"));
        for line in &u.summary {
            println!("  {line}");
        }
    }
    Ok(())
}

/// The linear layers of a quantized checkpoint that kept full-precision weights (2-D `.weight`
/// matrices of the text model other than the embeddings), by name and summarised per module
/// kind with the decoder layers that kept it: what stayed unquantized.
struct Unquantized {
    names: Vec<String>,
    dtypes: Vec<String>,
    summary: Vec<String>,
}

fn unquantized_linears(ckpt: &Checkpoint) -> Unquantized {
    use std::collections::BTreeMap;
    let mut names = vec![];
    let mut dtypes: Vec<String> = vec![];
    // Module kind within a layer (e.g. `mlp.up_proj`) → layers; modules outside layers alone.
    let mut kinds: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut other = vec![];
    for n in ckpt.names() {
        let Some(module) = n.strip_suffix(".weight") else { continue };
        if module.ends_with("embed_tokens") || n.starts_with("model.visual.") || n.starts_with("mtp.") {
            continue;
        }
        let Ok(t) = ckpt.tensor(n) else { continue };
        if t.shape.len() != 2 || matches!(t.dtype, fp4_format::DType::U8 | fp4_format::DType::F8E4M3) {
            continue;
        }
        let d = format!("{:?}", t.dtype).to_uppercase();
        if !dtypes.contains(&d) {
            dtypes.push(d);
        }
        names.push(module.to_string());
        let local = module.strip_prefix(ckpt.text_prefix).unwrap_or(module);
        let parsed = local.strip_prefix("layers.").and_then(|r| r.split_once('.'));
        match parsed.and_then(|(i, kind)| Some((i.parse::<usize>().ok()?, kind))) {
            Some((i, kind)) => kinds.entry(kind.to_string()).or_default().push(i),
            None => other.push(module.to_string()),
        }
    }
    // Kinds under one parent with the same layers share a line: `linear_attn.{in_proj_a,…}`.
    let mut lines: BTreeMap<(String, Vec<usize>), Vec<String>> = BTreeMap::new();
    for (kind, mut layers) in kinds {
        layers.sort_unstable();
        let (parent, leaf) = kind.rsplit_once('.').unwrap_or(("", &kind));
        lines.entry((parent.to_string(), layers)).or_default().push(leaf.to_string());
    }
    let mut summary = other;
    for ((parent, layers), leaves) in lines {
        let leaves = if leaves.len() == 1 { leaves[0].clone() } else { format!("{{{}}}", leaves.join(",")) };
        let dot = if parent.is_empty() { "" } else { "." };
        let word = if layers.len() == 1 { "layer" } else { "layers" };
        summary.push(format!("{parent}{dot}{leaves}  {word} {}", ranges(&layers)));
    }
    Unquantized { names, dtypes, summary }
}

/// `0,1,2,5,7,8` → `0-2,5,7-8`.
fn ranges(v: &[usize]) -> String {
    let mut out: Vec<String> = vec![];
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if j == i { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    out.join(",")
}
