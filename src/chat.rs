//! Chat prompts rendered from the model's own Jinja template.
//!
//! Instruction-tuned models only follow instructions when the conversation is laid out exactly
//! as in fine-tuning, and the template shipped with the model is the authority on that layout.
//! Templates are written for Hugging Face `transformers`, which renders them with Python's
//! Jinja2 in a particular configuration; this module reproduces that configuration with
//! minijinja so the same template gives the same text.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

/// ChatML, for models that ship no template: the most widespread layout, and the one most base
/// models have at least seen.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// Most template instructions one render may run (minijinja's fuel): a template is a program
/// from the model's author, so a loop that never ends must end here. Real templates spend a few
/// dozen instructions per message.
pub const MAX_TEMPLATE_STEPS: u64 = 20_000_000;

/// Most bytes a render may produce beyond four times the messages' own bytes: room for system
/// prompts and tool schemas, not for a template that multiplies its input without bound.
pub const MAX_TEMPLATE_EXTRA_OUTPUT: usize = 1 << 20;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `template`; syntax errors are reported here rather than on first use.
    ///
    /// `bos_token` and `eos_token` are the token *texts* (e.g. `<|im_start|>`), because
    /// templates splice them into the prompt as strings.
    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; templates are written so that
        // their block tags leave no stray newlines or indentation only under these settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates call Python string and dict methods (`.strip()`, `.items()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(MAX_TEMPLATE_STEPS));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // Replaces minijinja's HTML-safe `tojson`: transformers emits plain `json.dumps` output,
        // and tool schemas must reach the model unescaped.
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template.to_string())
            .map_err(|e| anyhow!("invalid chat template: {e}"))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, it ends with the opening of
    /// an assistant turn so the model answers rather than continuing the user's text.
    ///
    /// The text contains special tokens written out (`<|im_start|>`), so tokenize it with
    /// special-token parsing on.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| anyhow!("chat template: {e}"))?;
        let input: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
        let mut out = BoundedOutput { buf: Vec::new(), limit: input.saturating_mul(4) + MAX_TEMPLATE_EXTRA_OUTPUT };
        let rendered = template.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.buf).map_err(|_| anyhow!("the chat template produced invalid UTF-8")),
            Err(_) if out.buf.len() >= out.limit => {
                Err(anyhow!("the chat template's output exceeds {} bytes for this conversation", out.limit))
            }
            Err(e) => Err(anyhow!("rendering chat template: {e}")),
        }
    }
}

/// Collects a render's output and fails the write that would take it past `limit` bytes, which
/// stops the render there.
struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.buf.resize(self.limit, 0);
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Templates use this to reject conversations they cannot express (e.g. roles out of order).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `json.dumps` with transformers' defaults (`ensure_ascii=False`) and its keyword arguments:
/// `indent`, `separators`, `sort_keys`, `ensure_ascii`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = i64::try_from(v)?;
                Some(" ".repeat(n.clamp(0, 64) as usize))
            }
        },
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators.as_deref() {
        None => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(ErrorKind::InvalidOperation, "separators must be a pair"));
        }
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;

    let style = JsonStyle { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    if ensure_ascii.unwrap_or(false) {
        // Non-ASCII can only occur inside strings, so escaping it afterwards is safe.
        out = out.chars().fold(String::with_capacity(out.len()), |mut s, c| {
            if c.is_ascii() {
                s.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = write!(s, "\\u{unit:04x}");
                }
            }
            s
        });
    }
    Ok(Value::from(out))
}

/// Python `json.dumps` layout rules.
struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Deeper nesting than this is a cycle or an attack, not a tool schema.
const MAX_JSON_DEPTH: usize = 128;

impl JsonStyle {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
        if depth > MAX_JSON_DEPTH {
            return Err(Error::new(ErrorKind::InvalidOperation, "value nested too deeply for tojson"));
        }
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => push_json(out, value)?,
            ValueKind::String => push_json(out, value.as_str().unwrap_or_default())?,
            ValueKind::Bytes => push_json(out, &String::from_utf8_lossy(value.as_bytes().unwrap_or_default()))?,
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    // JSON keys are strings; Python converts numbers and booleans the same way.
                    match key.as_str() {
                        Some(s) => push_json(out, s)?,
                        None => push_json(out, &key.to_string())?,
                    }
                    out.push_str(&self.key_sep);
                    self.write(out, &value.get_item(key)?, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("cannot serialize {} to JSON", value.kind()),
                ));
            }
        }
        Ok(())
    }
}

/// Scalars go through serde_json, whose escaping matches Python's `ensure_ascii=False` output.
fn push_json<T: Serialize + ?Sized>(out: &mut String, v: &T) -> Result<(), Error> {
    let json = serde_json::to_string(v).map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    out.push_str(&json);
    Ok(())
}

/// The current date and time (UTC) formatted with the common `strftime` directives; templates
/// use it to tell the model today's date. Unknown directives are copied through, as glibc does.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Proleptic Gregorian (year, month 1-12, day 1-31) for days since 1970-01-01, via the
/// era-based decomposition (400-year cycles have a fixed length).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    // 1970-01-01 was a Thursday.
    let weekday = (days + 3).rem_euclid(7) as usize;
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[month as usize - 1] + day + u32::from(is_leap && month > 2);
    let month_name = MONTHS[month as usize - 1];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'j' => write!(out, "{yday:03}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{:02}", (hour + 11) % 12 + 1),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'B' => write!(out, "{month_name}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'A' => write!(out, "{}", WEEKDAYS[weekday]),
            'a' => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            'u' => write!(out, "{}", weekday + 1),
            'w' => write!(out, "{}", (weekday + 1) % 7),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'Z' => write!(out, "UTC"),
            'z' => write!(out, "+0000"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    #[test]
    fn a_template_that_never_ends_or_floods_is_stopped() {
        let spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(spin, "<s>", "</s>").unwrap();
        let t0 = std::time::Instant::now();
        let err = t.render(&msgs(&[("user", "hi")]), true).unwrap_err().to_string();
        assert!(err.contains("fuel") || err.contains("rendering"), "{err}");
        assert!(t0.elapsed().as_secs() < 30, "the fuel limit took {:?}", t0.elapsed());

        let flood = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}";
        let t = ChatTemplate::new(flood, "<s>", "</s>").unwrap();
        let err = t.render(&msgs(&[("user", &"x".repeat(1000))]), true).unwrap_err().to_string();
        assert!(err.contains("exceeds"), "{err}");
        // The same template within its budget renders.
        let few = "{% for i in range(100) %}{{ messages[0].content }}{% endfor %}";
        let t = ChatTemplate::new(few, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&msgs(&[("user", &"x".repeat(1000))]), true).unwrap().len(), 100_000);
    }

    #[test]
    fn chatml_fallback_renders() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap();
        let out = t.render(&msgs(&[("system", "S"), ("user", "Hi")]), true).unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let out = t.render(&msgs(&[("user", "Hi")]), false).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&msgs(&[("user", "a"), ("user", "b")]), false).unwrap(), "[a]\n[b]\n");
    }

    #[test]
    fn python_methods_and_special_tokens() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&msgs(&[("user", "  hi  ")]), false).unwrap(), "<s>HI</s>");
    }

    #[test]
    fn errors_are_reported_not_panicked() {
        assert!(ChatTemplate::new("{% for m in messages %}", "", "").is_err());
        assert!(ChatTemplate::new("{{ ", "", "").is_err());
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        let t = ChatTemplate::new("{{ messages[0].content.nosuchmethod() }}", "", "").unwrap();
        assert!(t.render(&msgs(&[("user", "x")]), false).is_err());
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let render = |src: &str| {
            let t = ChatTemplate::new(src, "", "").unwrap();
            t.render(&msgs(&[("user", "<b>&'é\"\n")]), false).unwrap()
        };
        // json.dumps(..., ensure_ascii=False): no HTML escaping, Python's separators.
        assert_eq!(render("{{ messages[0].content | tojson }}"), r#""<b>&'é\"\n""#);
        assert_eq!(render("{{ [1, 'a', none, true] | tojson }}"), r#"[1, "a", null, true]"#);
        assert_eq!(render("{{ {'b': 1, 'a': [2]} | tojson(sort_keys=true) }}"), r#"{"a": [2], "b": 1}"#);
        assert_eq!(
            render("{{ {'a': [1, 2], 'e': {}} | tojson(indent=2, sort_keys=true) }}"),
            "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"e\": {}\n}"
        );
        assert_eq!(render("{{ [1, 2] | tojson(separators=[',', ':']) }}"), "[1,2]");
        assert_eq!(render("{{ 'é🚀' | tojson(ensure_ascii=true) }}"), r#""\u00e9\ud83d\ude80""#);
        assert_eq!(render("{{ 1.5 | tojson }}"), "1.5");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(strftime("%A %B %e, %y %H:%M:%S %I%p %j %%%q", t), "Thursday February 29, 24 13:05:09 01PM 060 %%q");
        assert_eq!(strftime("%F %a %w %u", 0), "1970-01-01 Thu 4 4");
        assert_eq!(strftime("%F", -86_400), "1969-12-31");
        assert_eq!(strftime("trailing %", 0), "trailing %");
        assert!(!strftime_now("%Y-%m-%d".into()).is_empty());
    }
}
