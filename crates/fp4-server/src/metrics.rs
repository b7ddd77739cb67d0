//! Prometheus metrics: request and token counters, TTFT and inter-token-latency histograms, queue
//! depth, running sequences and cache use.

use crate::engine::Stats;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, inner: Mutex::new((Vec::new(), 0.0, 0)) }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.is_empty() {
            g.0 = vec![0; self.bounds.len()];
        }
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", g.0.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", g.2, g.1, g.2);
    }
}

const LATENCY: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

pub struct Metrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY),
            itl: Histogram::new(LATENCY),
        }
    }
}

impl Metrics {
    pub fn render(&self, stats: &Stats) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(&mut out, "fp4_requests_total", "HTTP generation requests received.", r(&self.requests));
        counter(&mut out, "fp4_request_errors_total", "Requests answered with an error.", r(&self.errors));
        counter(&mut out, "fp4_requests_finished_total", "Sequences that finished.", r(&stats.requests_finished));
        counter(
            &mut out,
            "fp4_requests_cancelled_total",
            "Sequences cancelled (client gone, stop string).",
            r(&stats.requests_cancelled),
        );
        counter(&mut out, "fp4_prompt_tokens_total", "Prompt tokens processed.", r(&stats.prompt_tokens));
        counter(&mut out, "fp4_generation_tokens_total", "Tokens generated.", r(&stats.generated_tokens));
        gauge(
            &mut out,
            "fp4_num_requests_waiting",
            "Requests waiting for a slot.",
            stats.waiting.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "fp4_num_requests_running",
            "Sequences being computed.",
            stats.running.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "fp4_cache_bytes_used",
            "Cache bytes held by running sequences (their GDN state slots and the KV blocks they hold or will take when their prefill ends).",
            stats.cache_bytes.load(Ordering::Relaxed) as u64,
        );
        counter(
            &mut out,
            "fp4_num_preemptions_total",
            "Sequences preempted because the KV blocks ran out (their state recomputed later by a prefill).",
            r(&stats.preemptions),
        );
        counter(&mut out, "fp4_decode_steps_total", "Batched decode steps.", r(&stats.decode_steps));
        counter(
            &mut out,
            "fp4_decode_step_tokens_total",
            "Sequences decoded by batched decode steps (over fp4_decode_steps_total: the mean batch size).",
            r(&stats.decode_batch_tokens),
        );
        counter(
            &mut out,
            "fp4_decode_graph_replays_total",
            "Decode steps replayed from a captured CUDA graph.",
            r(&stats.graph_replays),
        );
        counter(
            &mut out,
            "fp4_decode_step_microseconds_total",
            "Wall time of the batched decode steps.",
            r(&stats.decode_step_micros),
        );
        counter(
            &mut out,
            "fp4_prefix_cache_hits_total",
            "Prompts resumed from a prefix-cache snapshot.",
            r(&stats.prefix_hits),
        );
        counter(
            &mut out,
            "fp4_prefix_cache_misses_total",
            "Prompts prefilled from the start.",
            r(&stats.prefix_misses),
        );
        counter(
            &mut out,
            "fp4_prefix_cache_cached_tokens_total",
            "Prompt tokens restored from the prefix cache instead of prefilled.",
            r(&stats.prefix_cached_tokens),
        );
        gauge(
            &mut out,
            "fp4_prefix_cache_entries",
            "Prompt snapshots held.",
            stats.prefix_entries.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "fp4_prefix_cache_bytes",
            "Bytes of the prompt snapshots held (within --cache-budget).",
            stats.prefix_bytes.load(Ordering::Relaxed) as u64,
        );
        // Speculative decoding, as vLLM counts it (acceptance rate = accepted / draft tokens;
        // mean accepted length = 1 + accepted / drafts).
        counter(
            &mut out,
            "fp4_spec_decode_num_drafts_total",
            "Speculative verifies (one per drafting sequence per step).",
            r(&stats.spec_verifies),
        );
        counter(
            &mut out,
            "fp4_spec_decode_num_draft_tokens_total",
            "Tokens drafted by the MTP head.",
            r(&stats.spec_drafted),
        );
        counter(
            &mut out,
            "fp4_spec_decode_num_accepted_tokens_total",
            "Drafted tokens the main model kept.",
            r(&stats.spec_accepted),
        );
        self.ttft.render(&mut out, "fp4_time_to_first_token_seconds", "Time from request to first generated token.");
        self.itl.render(&mut out, "fp4_inter_token_latency_seconds", "Time between generated tokens.");
        out
    }
}
