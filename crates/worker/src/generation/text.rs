//! Text around the tokens: chat templates, incremental detokenization and
//! stop sequences.

use minijinja::{Environment, ErrorKind as JinjaErrorKind, context};
use serde::Serialize;
use tokenizers::Tokenizer;

/// A model's Jinja chat template.
#[derive(Debug)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// One message as the template sees it.
#[derive(Debug, Serialize)]
pub(crate) struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub name: &'a str,
}

impl ChatTemplate {
    /// Parses the template; errors say where it is malformed.
    pub(crate) fn new(source: String, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    JinjaErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| format!("chat template: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages`, ending where the assistant's answer begins.
    pub(crate) fn render(&self, messages: &[Message<'_>]) -> Result<String, String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                // The template refused the conversation (e.g. roles out of order).
                JinjaErrorKind::InvalidOperation => e.detail().unwrap_or("refused").to_string(),
                _ => format!("chat template: {e}"),
            })
    }
}

/// Turns tokens into text as they arrive. A character split across tokens
/// (byte-level BPE) is held until complete; text is decoded over a short
/// window so that decoders which depend on the previous token stay right.
#[derive(Debug, Default)]
pub(crate) struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens up to here have been turned into text.
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the text it completes (possibly empty).
    pub(crate) fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix..self.read]);
        let after = decode(&self.ids[self.prefix..]);
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let new = match after.get(before.len()..) {
                Some(new) if after.starts_with(&before) => new.to_string(),
                // The window decodes differently with the new token: emit
                // what is beyond the old text's length on a char boundary.
                _ => after.chars().skip(before.chars().count()).collect(),
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            new
        } else {
            String::new()
        }
    }
}

/// Finds stop sequences in streamed text. Text that could still turn out to
/// be the start of a stop sequence is held back until it is decided.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What a piece of text did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Matched {
    /// Text safe to send.
    pub text: String,
    /// The stop sequence found; the text ends just before it.
    pub stop: Option<String>,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    pub(crate) fn push(&mut self, delta: &str) -> Matched {
        if self.stops.is_empty() {
            return Matched {
                text: delta.to_string(),
                stop: None,
            };
        }
        self.pending.push_str(delta);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, s)| (*at, std::cmp::Reverse(s.len())));
        if let Some((at, stop)) = found {
            let stop = stop.clone();
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Matched {
                text,
                stop: Some(stop),
            };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| held_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let split = self.pending.len() - hold;
        let text = self.pending[..split].to_string();
        self.pending.drain(..split);
        Matched { text, stop: None }
    }

    /// The held text, when generation ends without a stop sequence.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`.
fn held_prefix(text: &str, stop: &str) -> usize {
    let longest = stop.len().saturating_sub(1).min(text.len());
    (1..=longest)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(matcher: &mut StopMatcher, deltas: &[&str]) -> (String, Option<String>) {
        let mut text = String::new();
        for d in deltas {
            let m = matcher.push(d);
            text.push_str(&m.text);
            if m.stop.is_some() {
                return (text, m.stop);
            }
        }
        text.push_str(&matcher.flush());
        (text, None)
    }

    #[test]
    fn a_stop_sequence_split_across_deltas_is_found_and_not_sent() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        assert_eq!(
            m.push("Hello"),
            Matched {
                text: "Hello".into(),
                stop: None
            }
        );
        assert_eq!(
            m.push(" there\n"),
            Matched {
                text: " there".into(),
                stop: None
            }
        );
        assert_eq!(
            m.push("\nUs"),
            Matched {
                text: String::new(),
                stop: None
            }
        );
        assert_eq!(
            m.push("er: hi"),
            Matched {
                text: String::new(),
                stop: Some("\n\nUser:".into())
            }
        );
    }

    #[test]
    fn held_text_that_turns_out_not_to_stop_is_sent() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(
            all(&mut m, &["ab", "ST", "Ox", "yz"]),
            ("abSTOxyz".into(), None)
        );
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(
            all(&mut m, &["ab", "ST"]),
            ("abST".into(), None),
            "flushed at the end"
        );
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(all(&mut m, &["xxabc"]), ("xx".into(), Some("a".into())));
        let mut none = StopMatcher::new(Vec::new());
        assert_eq!(all(&mut none, &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(all(&mut m, &["caf", "é", "?"]), ("café?".into(), None));
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(
            all(&mut m, &["caf", "é", "!"]),
            ("caf".into(), Some("é!".into()))
        );
    }

    #[test]
    fn chat_templates_render_messages_and_refuse_with_their_message() {
        let source = "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let template = ChatTemplate::new(source.to_string(), "<s>", "</s>").unwrap();
        let user = Message {
            role: "user",
            content: "hi",
            name: "",
        };
        assert_eq!(template.render(&[user]).unwrap(), "<user>hi</s><assistant>");
        let bad = Message {
            role: "bad",
            content: "x",
            name: "",
        };
        assert_eq!(template.render(&[bad]).unwrap_err(), "no bad roles");
        assert!(ChatTemplate::new("{% for %}".into(), "", "").is_err());
    }
}
