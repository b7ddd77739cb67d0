//! Which linear layers are quantized, and which share scales.

use fp4_format::quant_config::glob_match;
use fp4_format::{Checkpoint, LayerType};

/// What to quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every linear layer except the default exclusions (ModelOpt `NVFP4_DEFAULT_CFG`).
    Rtn,
    /// The layers of `Rtn`, calibrated with AWQ-lite.
    AwqLite,
    /// Only the MLPs (ModelOpt `NVFP4_MLP_ONLY_CFG`).
    MlpOnly,
    /// The layers of `Rtn`, each fused group in NVFP4, FP8 or BF16 by KL sensitivity.
    AutoMixed,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Rtn => "rtn",
            Strategy::AwqLite => "awq_lite",
            Strategy::MlpOnly => "mlp_only",
            Strategy::AutoMixed => "auto_mixed",
        }
    }
}

/// A quantizable module of one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Full checkpoint name, e.g. `model.language_model.layers.0.mlp.up_proj`.
    pub name: String,
    pub layer: usize,
    pub quantize: bool,
    /// Modules that share one weight amax (`weight_scale_2`) and one `input_scale` (fused by vLLM).
    pub group: usize,
}

/// Fused groups of Qwen3.5, by module suffix: ModelOpt gives each the max amax of its members,
/// and vLLM fuses them (`qkv_proj`, `gate_up_proj`, `in_proj_qkvz`, `in_proj_ba`).
const GROUPS: [&[&str]; 4] = [
    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    &["mlp.gate_proj", "mlp.up_proj"],
    &["linear_attn.in_proj_qkv", "linear_attn.in_proj_z"],
    &["linear_attn.in_proj_b", "linear_attn.in_proj_a"],
];

/// ModelOpt's default-disabled patterns that apply to Qwen3.5 text layers.
const DEFAULT_EXCLUDED: [&str; 2] = ["linear_attn.in_proj_a", "linear_attn.in_proj_b"];

#[derive(Debug, Clone)]
pub struct Plan {
    pub strategy: Strategy,
    pub modules: Vec<Module>,
    /// `exclude_modules` for the configs: unquantized modules, summarised by prefix.
    pub exclude_modules: Vec<String>,
    /// Module groups forced unquantized because a user pattern named only some members.
    pub widened: Vec<String>,
    /// `--quantize-lm-head`: the LM head is quantized too (else it stays BF16, as in ModelOpt).
    pub lm_head_quantized: bool,
}

/// Does a `--exclude-layers` item match a module name? Globs (`*`, `?`, `[`) match the whole
/// name; plain text matches at dot boundaries (`layers.1` covers layer 1, not layer 10;
/// `linear_attn` covers every GDN projection).
pub fn user_pattern_matches(pattern: &str, module: &str) -> bool {
    if pattern.contains(['*', '?', '[']) {
        return glob_match(pattern.as_bytes(), module.as_bytes());
    }
    let mut start = 0;
    while let Some(i) = module[start..].find(pattern).map(|i| i + start) {
        let end = i + pattern.len();
        let left_ok = i == 0 || module.as_bytes()[i - 1] == b'.';
        let right_ok = end == module.len() || module.as_bytes()[end] == b'.';
        if left_ok && right_ok {
            return true;
        }
        start = i + 1;
    }
    false
}

/// `--exclude-layers` items with the last layers named by position resolved against a model
/// of `layers` decoder layers: `layers.last` and `layers.-1` are `layers.{layers-1}`,
/// `layers.-k` is `layers.{layers-k}` (a `-k` beyond the model stays as written, and matches
/// nothing).
pub fn resolve_patterns(patterns: &[String], layers: usize) -> Vec<String> {
    patterns
        .iter()
        .map(|p| {
            let mut out = String::new();
            for (i, part) in p.split('.').enumerate() {
                if i > 0 {
                    out.push('.');
                }
                let after_layers = out.ends_with("layers.");
                let back = match part {
                    "last" if after_layers => Some(1),
                    _ if after_layers && part.starts_with('-') => part[1..].parse::<usize>().ok(),
                    _ => None,
                };
                match back.filter(|&k| (1..=layers).contains(&k)) {
                    Some(k) => out.push_str(&(layers - k).to_string()),
                    None => out.push_str(part),
                }
            }
            out
        })
        .collect()
}

/// The `--exclude-layers` items that name nothing in the model: no linear of any decoder layer
/// and not the embeddings or the LM head (which are never quantized, so naming them is fine).
pub fn unmatched_patterns(ckpt: &Checkpoint, patterns: &[String]) -> Vec<String> {
    let plan = Plan::new(ckpt, Strategy::Rtn, &[]);
    let always_kept = [ckpt.text_name("embed_tokens"), "lm_head".to_string()];
    let resolved = resolve_patterns(patterns, ckpt.config.num_hidden_layers);
    patterns
        .iter()
        .zip(&resolved)
        .filter(|(_, r)| {
            !plan
                .modules
                .iter()
                .map(|m| m.name.as_str())
                .chain(always_kept.iter().map(String::as_str))
                .any(|name| user_pattern_matches(r, name))
        })
        .map(|(p, _)| p.clone())
        .collect()
}

impl Plan {
    pub fn new(ckpt: &Checkpoint, strategy: Strategy, user_excludes: &[String]) -> Plan {
        let cfg = &ckpt.config;
        let user_excludes = resolve_patterns(user_excludes, cfg.num_hidden_layers);
        let mut modules = Vec::new();
        let mut group = 0;
        for (i, t) in cfg.layer_types.iter().enumerate() {
            let prefix = ckpt.text_name(&format!("layers.{i}"));
            let names: &[&str] = match t {
                LayerType::FullAttention => {
                    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
                }
                LayerType::LinearAttention => &[
                    "linear_attn.in_proj_qkv",
                    "linear_attn.in_proj_z",
                    "linear_attn.in_proj_b",
                    "linear_attn.in_proj_a",
                    "linear_attn.out_proj",
                ],
            };
            let all = names.iter().chain(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"].iter());
            let mut layer_modules: Vec<Module> = Vec::new();
            for suffix in all {
                let name = format!("{prefix}.{suffix}");
                let by_strategy = match strategy {
                    Strategy::Rtn | Strategy::AwqLite | Strategy::AutoMixed => !DEFAULT_EXCLUDED.contains(suffix),
                    Strategy::MlpOnly => suffix.starts_with("mlp."),
                };
                let by_user = user_excludes.iter().any(|p| user_pattern_matches(p, &name));
                // Group id: shared by the members of a fused group within this layer.
                let g = match GROUPS.iter().position(|g| g.contains(suffix)) {
                    Some(gi) => match layer_modules.iter().find(|m| GROUPS[gi].iter().any(|s| m.name.ends_with(s))) {
                        Some(m) => m.group,
                        None => {
                            group += 1;
                            group
                        }
                    },
                    None => {
                        group += 1;
                        group
                    }
                };
                layer_modules.push(Module { name, layer: i, quantize: by_strategy && !by_user, group: g });
            }
            modules.extend(layer_modules);
        }
        // A fused group is quantized all or nothing (vLLM refuses mixed shards).
        let mut widened = Vec::new();
        let groups: Vec<usize> = modules.iter().map(|m| m.group).collect();
        for g in groups {
            let members: Vec<usize> = (0..modules.len()).filter(|&i| modules[i].group == g).collect();
            let q = members.iter().filter(|&&i| modules[i].quantize).count();
            if q > 0 && q < members.len() {
                for &i in &members {
                    if modules[i].quantize {
                        modules[i].quantize = false;
                        widened.push(modules[i].name.clone());
                    }
                }
            }
        }
        let exclude_modules = summarise_exclusions(ckpt, &modules, false);
        Plan { strategy, modules, exclude_modules, widened, lm_head_quantized: false }
    }

    pub fn quantized(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter().filter(|m| m.quantize)
    }

    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// Marks `names` unquantized (auto_mixed chose BF16) and rebuilds `exclude_modules`.
    pub fn keep_unquantized(&mut self, ckpt: &Checkpoint, names: &[String]) {
        for m in self.modules.iter_mut().filter(|m| names.contains(&m.name)) {
            m.quantize = false;
        }
        self.exclude_modules = summarise_exclusions(ckpt, &self.modules, self.lm_head_quantized);
    }

    /// Marks the LM head quantized (`--quantize-lm-head`) and rebuilds `exclude_modules`.
    pub fn quantize_lm_head(&mut self, ckpt: &Checkpoint) {
        self.lm_head_quantized = true;
        self.exclude_modules = summarise_exclusions(ckpt, &self.modules, true);
    }
}

/// The `exclude_modules` list: lm_head (unless quantized) and the embeddings, each unquantized
/// module (a whole mixer or MLP as `prefix*` when none of it is quantized, as ModelOpt writes
/// it), the GDN conv, and wildcards for vision and MTP weights when present.
fn summarise_exclusions(ckpt: &Checkpoint, modules: &[Module], lm_head_quantized: bool) -> Vec<String> {
    let mut out = vec![ckpt.text_name("embed_tokens")];
    if !lm_head_quantized {
        out.insert(0, "lm_head".to_string());
    }
    let mut parents: Vec<String> = Vec::new();
    for m in modules {
        let parent = m.name.rsplit_once('.').map_or(m.name.as_str(), |(p, _)| p).to_string();
        if !parents.contains(&parent) {
            parents.push(parent);
        }
    }
    for parent in parents {
        let children: Vec<&Module> =
            modules.iter().filter(|m| m.name.rsplit_once('.').map(|(p, _)| p) == Some(&parent)).collect();
        if children.iter().all(|m| !m.quantize) {
            out.push(format!("{parent}*"));
            continue;
        }
        if parent.ends_with(".linear_attn") {
            out.push(format!("{parent}.conv1d"));
        }
        out.extend(children.iter().filter(|m| !m.quantize).map(|m| m.name.clone()));
    }
    if ckpt.names().any(|n| n.starts_with("model.visual.")) {
        out.push("model.visual*".into());
    }
    if ckpt.names().any(|n| n.starts_with("mtp.")) {
        out.push("mtp*".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::user_pattern_matches as m;

    #[test]
    fn user_patterns_match_at_dot_boundaries() {
        let n = "model.language_model.layers.1.linear_attn.in_proj_qkv";
        assert!(m("layers.1", n) && m("linear_attn", n) && m("in_proj_qkv", n));
        assert!(!m("layers.1", "model.language_model.layers.10.mlp.up_proj"));
        assert!(!m("in_proj", n), "partial names do not match");
        assert!(m("*layers.1[0-9].*", "model.layers.12.mlp.up_proj"));
    }

    #[test]
    fn last_layers_resolve_by_position() {
        let p = |v: &[&str]| super::resolve_patterns(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), 32);
        assert_eq!(
            p(&["layers.last", "layers.-1", "layers.-2.mlp", "*layers.last.*"]),
            vec!["layers.31", "layers.31", "layers.30.mlp", "*layers.31.*"]
        );
        // Beyond the model, or not after `layers.`: as written.
        assert_eq!(p(&["layers.-33", "last", "mlp.-1", "layers.0"]), vec!["layers.-33", "last", "mlp.-1", "layers.0"]);
    }

    #[test]
    fn unmatched_patterns_are_named() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-quant");
        let ckpt = fp4_format::Checkpoint::open(&dir).unwrap();
        let n = ckpt.config.num_hidden_layers;
        let pats: Vec<String> =
            ["linear_attn", "layers.0", "layers.last", "embed_tokens", "lm_head", "layers.31", "mlp.up"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        assert!(n < 31, "the fixture is small");
        assert_eq!(super::unmatched_patterns(&ckpt, &pats), vec!["layers.31".to_string(), "mlp.up".to_string()]);
        let plan = super::Plan::new(&ckpt, super::Strategy::Rtn, &["layers.last".to_string()]);
        let last = ckpt.text_name(&format!("layers.{}.", n - 1));
        assert!(plan.modules.iter().filter(|m| m.name.starts_with(&last)).all(|m| !m.quantize));
        assert!(plan.modules.iter().any(|m| m.quantize));
    }
}
