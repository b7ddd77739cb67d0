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
    Ok(())
}
