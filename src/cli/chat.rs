//! `fp4 chat render | parse`: the chat layer on its own, for users debugging prompts and parsers.

use anyhow::{bail, Context};
use clap::Subcommand;
use fp4_chat::{parse, ChatTemplate, DeltaMerger, Detokenizer, OutputConfig, RenderRequest, StreamParser, Tokenizer};
use serde_json::{Map, Value};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Render a conversation with the model's chat template; print the prompt and its token ids.
    Render(RenderArgs),
    /// Split raw model output (stdin) into an OpenAI assistant message: content,
    /// reasoning_content and tool_calls (qwen3 reasoning parser, qwen3_coder tool parser).
    Parse(ParseArgs),
}

#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// Model directory (tokenizer.json and chat_template.jinja or tokenizer_config.json).
    #[arg(long)]
    model: PathBuf,
    /// JSON file: a list of OpenAI messages, or a chat request object with `messages` (and `tools`).
    #[arg(long)]
    messages: PathBuf,
    /// JSON file: a list of OpenAI tools (or an object with `tools`).
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Render with `enable_thinking=false` (an empty think block closes the prompt).
    #[arg(long)]
    no_thinking: bool,
    /// End after the last message instead of opening an assistant turn.
    #[arg(long)]
    no_generation_prompt: bool,
    /// Extra template variables as a JSON object (vLLM's `chat_template_kwargs`).
    #[arg(long)]
    chat_template_kwargs: Option<String>,
    /// Print {"prompt", "ids"} as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ParseArgs {
    /// JSON file with the request's tools (a list, or an object with `tools`); enables the
    /// qwen3_coder tool parser.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Model directory: with --stream and no --chunks, the output is tokenized and fed one
    /// token at a time, as a server streams it.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The request had `enable_thinking=false`: everything is content.
    #[arg(long)]
    no_thinking: bool,
    /// Do not run the qwen3 reasoning parser.
    #[arg(long)]
    no_reasoning_parser: bool,
    /// Feed the output as streamed deltas and print the message they merge into.
    #[arg(long)]
    stream: bool,
    /// JSON file with the deltas (a list of strings); default: one character per delta.
    #[arg(long, requires = "stream")]
    chunks: Option<PathBuf>,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Render(a) => render(a),
        Command::Parse(a) => parse_cmd(a),
    }
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// A list, or the list under `key` of an object.
fn list(v: Value, key: &str, path: &Path) -> anyhow::Result<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Object(mut o) => match o.remove(key) {
            Some(Value::Array(items)) => Ok(items),
            _ => bail!("{}: expected a JSON list or an object with a `{key}` list", path.display()),
        },
        _ => bail!("{}: expected a JSON list or an object with a `{key}` list", path.display()),
    }
}

fn render(a: RenderArgs) -> anyhow::Result<()> {
    let request = read_json(&a.messages)?;
    let mut tools = match (&request, &a.tools) {
        (_, Some(p)) => Some(list(read_json(p)?, "tools", p)?),
        (Value::Object(o), None) => o.get("tools").and_then(Value::as_array).cloned(),
        _ => None,
    };
    if tools.as_ref().is_some_and(Vec::is_empty) {
        tools = None;
    }
    let messages = list(request, "messages", &a.messages)?;
    let mut kwargs: Map<String, Value> = match &a.chat_template_kwargs {
        Some(s) => serde_json::from_str(s).context("--chat-template-kwargs must be a JSON object")?,
        None => Map::new(),
    };
    if a.no_thinking {
        kwargs.insert("enable_thinking".into(), Value::Bool(false));
    }
    let template = ChatTemplate::from_dir(&a.model, tools.is_some())?;
    let prompt = template.render(&RenderRequest {
        messages: &messages,
        tools: tools.as_deref(),
        add_generation_prompt: !a.no_generation_prompt,
        kwargs,
    })?;
    let tok =
        Tokenizer::from_dir(&a.model)?.with_context(|| format!("{}: no {}", a.model.display(), Tokenizer::FILE))?;
    let ids = tok.encode(&prompt)?;
    if a.json {
        println!("{}", serde_json::json!({"prompt": prompt, "ids": ids}));
    } else {
        println!("{prompt}");
        println!("--- {} tokens", ids.len());
        println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    }
    Ok(())
}

fn parse_cmd(a: ParseArgs) -> anyhow::Result<()> {
    let mut output = String::new();
    std::io::stdin().read_to_string(&mut output).context("cannot read the model output from stdin")?;
    let tools = match &a.tools {
        Some(p) => Some(list(read_json(p)?, "tools", p)?),
        None => None,
    };
    let cfg = OutputConfig {
        reasoning_parser: !a.no_reasoning_parser,
        thinking: !a.no_thinking,
        tools,
        only_listed_tools: false,
    };
    let message = if a.stream {
        let chunks: Vec<String> = match (&a.chunks, &a.model) {
            (Some(p), _) => {
                let v = list(read_json(p)?, "chunks", p)?;
                let chunks: Option<Vec<String>> = v.into_iter().map(|c| c.as_str().map(str::to_string)).collect();
                let chunks = chunks.with_context(|| format!("{}: every chunk must be a string", p.display()))?;
                if chunks.concat() != output {
                    bail!("{}: the chunks do not concatenate to the text on stdin", p.display());
                }
                chunks
            }
            (None, Some(model)) => token_chunks(model, &output)?,
            (None, None) => output.chars().map(String::from).collect(),
        };
        let mut parser = StreamParser::new(cfg);
        let mut merger = DeltaMerger::default();
        for chunk in &chunks {
            if let Some(d) = parser.push(chunk) {
                merger.push(&d);
            }
        }
        if let Some(d) = parser.finish() {
            merger.push(&d);
        }
        merger.finish()
    } else {
        parse(&output, &cfg)
    };
    println!("{}", serde_json::to_string(&message)?);
    Ok(())
}

/// The text deltas a server would stream for `text`: tokenize, then detokenize incrementally.
fn token_chunks(model: &Path, text: &str) -> anyhow::Result<Vec<String>> {
    let tok = Tokenizer::from_dir(model)?.with_context(|| format!("{}: no {}", model.display(), Tokenizer::FILE))?;
    let ids = tok.encode(text)?;
    let mut detok = Detokenizer::new(&tok, false);
    let mut chunks = Vec::new();
    for id in ids {
        chunks.extend(detok.push(id)?);
    }
    chunks.extend(detok.finish()?);
    Ok(chunks)
}
