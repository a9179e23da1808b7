//! BIG-bench JSON tasks (`task.json`) posed zero-shot as BIG-bench's own `JsonTask` poses them
//! (bigbench 0.0.1, `bigbench/api/json_task.py`): the prompt is
//! `task_prefix + example_input_prefix + input [+ choice_prefix + choice, ...] + example_output_prefix`
//! with its defaults (`""`, `"\nQ: "`, `"\nA: "`, `"\n  choice: "`, choices appended in the order
//! numpy's `RandomState(42).permutation` puts the sorted choices in), duplicate examples are
//! dropped, and each question earns the `target_scores` value of the choice picked
//! (`multiple_choice_grade`). A task without examples is a composite: its `subtasks` (a list of
//! task objects) or the `task.json` of each folder beside it (in name order), each posed with its
//! own settings; the mean over all their questions is BIG-bench's example-weighted aggregate.
//!
//! Choices keep the file's order, as BIG-bench's do (the first of equal log-likelihoods wins).
//!
//! BIG-bench as its Hugging Face dataset serves it (records with `inputs`,
//! `multiple_choice_targets`, `targets`) is posed as lm-eval's bigbench tasks pose it instead.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{EvalError, Result};
use crate::zeroshot::{bad, check, At, McExample};

/// The seed BIG-bench shuffles appended choices with (`JsonTask`'s `random_seed` default).
const SEED: u32 = 42;

/// Whether `v` (a JSON object read from `path`) is a BIG-bench task: it has `examples` or
/// `subtasks`, or it names itself and folders beside it hold `task.json` files.
pub(crate) fn is_task(path: &Path, v: &Value) -> bool {
    v.get("examples").is_some_and(Value::is_array)
        || v.get("subtasks").is_some_and(Value::is_array)
        || (v.get("name").is_some() && !subtask_files(path).is_empty())
}

/// The questions of a BIG-bench task read from `path` (its `text`, already parsed as `v`).
pub(crate) fn load(path: &Path, text: &str, v: &Value) -> Result<Vec<McExample>> {
    let mut out = Vec::new();
    load_into(path, v, &KeyOrder::of(text), &mut out)?;
    if out.is_empty() {
        return Err(bad(path, At::File, "no examples"));
    }
    Ok(out)
}

fn load_into(path: &Path, task: &Value, order: &KeyOrder, out: &mut Vec<McExample>) -> Result<()> {
    if let Some(examples) = task.get("examples").and_then(Value::as_array) {
        let format = Format::of(path, task)?;
        let mut seen = HashSet::new();
        for (i, e) in examples.iter().enumerate() {
            // BIG-bench drops an example that repeats an earlier one exactly.
            if seen.insert(e.to_string()) {
                let keys = order.examples.get(i).map(|x| x.target_scores.0.as_slice());
                out.push(format.example(path, At::Example(i + 1), e, keys)?);
            }
        }
        return Ok(());
    }
    if let Some(subtasks) = task.get("subtasks").and_then(Value::as_array) {
        for (i, t) in subtasks.iter().enumerate() {
            load_into(path, t, order.subtasks.get(i).unwrap_or(&KeyOrder::default()), out)?;
        }
        return Ok(());
    }
    let files = subtask_files(path);
    if files.is_empty() {
        return Err(bad(
            path,
            At::File,
            "a BIG-bench task needs \"examples\", \"subtasks\" or folders holding task.json",
        ));
    }
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| EvalError::Io { path: f.clone(), source: e })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let v: Value = serde_json::from_str(text).map_err(|e| bad(&f, At::File, format!("invalid json: {e}")))?;
        load_into(&f, &v, &KeyOrder::of(text), out)?;
    }
    Ok(())
}

/// Whether `path`, a `task.json`, is a subtask that a composite among `files` reads from its
/// folders: the `task.json` two folders up is in `files` and has neither `examples` nor
/// `subtasks` (so it reads the `task.json` of each folder beside it, this one's among them).
pub(crate) fn read_by_composite(path: &Path, files: &HashSet<&Path>) -> bool {
    let Some(up) = path.parent().and_then(Path::parent) else { return false };
    let composite = up.join("task.json");
    if path.file_name() != Some("task.json".as_ref()) || !files.contains(composite.as_path()) {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(&composite) else { return false };
    let Ok(v) = serde_json::from_str::<Value>(text.strip_prefix('\u{feff}').unwrap_or(&text)) else { return false };
    !v.get("examples").is_some_and(Value::is_array) && !v.get("subtasks").is_some_and(Value::is_array)
}

/// `task.json` in each folder beside `path`, sorted.
fn subtask_files(path: &Path) -> Vec<std::path::PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<_> =
        entries.filter_map(|e| Some(e.ok()?.path().join("task.json"))).filter(|f| f.is_file()).collect();
    files.sort();
    files
}

/// The order of each example's `target_scores` keys in the file (a parsed `Value` sorts them), by
/// example and by subtask; empty where the file does not have that shape (its errors are reported
/// from the value).
#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct KeyOrder {
    examples: Vec<ExampleOrder>,
    subtasks: Vec<KeyOrder>,
}

impl KeyOrder {
    fn of(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_default()
    }
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct ExampleOrder {
    target_scores: Keys,
}

/// An object's keys in the order they are written.
#[derive(Default)]
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A task's prompt settings.
struct Format {
    task_prefix: String,
    input_prefix: String,
    output_prefix: String,
    choice_prefix: String,
    append_choices: bool,
}

impl Format {
    fn of(path: &Path, task: &Value) -> Result<Self> {
        let text = |key: &str, default: &str| -> Result<String> {
            match task.get(key) {
                None => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(bad(path, At::File, format!("\"{key}\" is not a string"))),
            }
        };
        let append_choices = match task.get("append_choices_to_input") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad(path, At::File, "\"append_choices_to_input\" is not true or false")),
        };
        Ok(Self {
            task_prefix: text("task_prefix", "")?,
            input_prefix: text("example_input_prefix", "\nQ: ")?,
            output_prefix: text("example_output_prefix", "\nA: ")?,
            choice_prefix: text("choice_prefix", "\n  choice: ")?,
            append_choices,
        })
    }

    /// One question; `keys`: its choices in the file's order, where known.
    fn example(&self, path: &Path, at: At, e: &Value, keys: Option<&[String]>) -> Result<McExample> {
        let input = e.get("input").and_then(Value::as_str).ok_or_else(|| bad(path, at, "example lacks \"input\""))?;
        let scores = e
            .get("target_scores")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(path, at, "example lacks \"target_scores\" (not a multiple-choice task?)"))?;
        // The file's order, as Python's json puts a key written twice: in its first place (with
        // its last value, which the map holds). The map's (sorted) order where the file's is not
        // known.
        let keys: Vec<&String> = match keys {
            Some(k) => {
                let mut seen = HashSet::new();
                let first: Vec<&String> = k.iter().filter(|c| seen.insert(*c)).collect();
                if seen == scores.keys().collect() {
                    first
                } else {
                    scores.keys().collect()
                }
            }
            None => scores.keys().collect(),
        };
        let mut choices = Vec::with_capacity(scores.len());
        let mut credit = Vec::with_capacity(scores.len());
        for c in keys {
            let s = &scores[c];
            let s = s.as_f64().ok_or_else(|| bad(path, at, format!("the target score of {c:?} is not a number")))?;
            choices.push(c.clone());
            credit.push(s);
        }
        let (lo, hi) = credit.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        if credit.len() < 2 || hi <= lo {
            return Err(bad(path, at, "no correct choice: a choice needs a higher target score than another"));
        }
        let gold = credit.iter().position(|&s| s == hi).unwrap_or(0);
        let mut context = format!("{}{}{input}", self.task_prefix, self.input_prefix);
        if self.append_choices {
            // BIG-bench shuffles the sorted choices.
            let mut shown: Vec<&str> = choices.iter().map(String::as_str).collect();
            shown.sort_unstable();
            numpy_permutation(&mut shown, SEED);
            for c in shown {
                context.push_str(&self.choice_prefix);
                context.push_str(c);
            }
        }
        context.push_str(&self.output_prefix);
        Ok(McExample { scores: credit, ..McExample::new(context, choices, gold) })
    }
}

/// Whether `v` is a record of BIG-bench as its Hugging Face dataset serves it (`inputs`,
/// `multiple_choice_targets`, `targets`: lm-eval's `hails/bigbench`).
pub(crate) fn is_hub_record(v: &Value) -> bool {
    v.get("inputs").is_some_and(Value::is_string) && v.get("multiple_choice_targets").is_some_and(Value::is_array)
}

/// A hub record posed as lm-eval's bigbench multiple-choice tasks pose it (template a): `inputs`
/// as they are, the choices after a space, the first of `targets` right; `None` for a record
/// without choices (a generative one), which lm-eval's filter drops.
pub(crate) fn hub_record(path: &Path, at: At, v: &Value) -> Result<Option<McExample>> {
    let inputs = v.get("inputs").and_then(Value::as_str).unwrap_or_default();
    let choices = v.get("multiple_choice_targets").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    if choices.is_empty() {
        return Ok(None);
    }
    let choices: Vec<&str> = choices
        .iter()
        .map(|c| c.as_str().ok_or_else(|| bad(path, at, "multiple_choice_targets holds a non-string")))
        .collect::<Result<_>>()?;
    let target = v
        .get("targets")
        .and_then(|t| t.get(0))
        .and_then(Value::as_str)
        .ok_or_else(|| bad(path, at, "missing \"targets\" (a list of strings)"))?;
    let gold = choices
        .iter()
        .position(|c| *c == target)
        .ok_or_else(|| bad(path, at, format!("targets[0] {target:?} is not one of multiple_choice_targets")))?;
    let e = McExample::new(inputs, choices.iter().map(|c| format!(" {c}")).collect(), gold);
    check(path, at, e).map(Some)
}

/// Shuffles `items` as numpy's legacy `RandomState(seed).permutation(items)` does: Fisher–Yates
/// from the end, each index drawn from MT19937 by masked rejection (numpy's `random_interval`).
pub(crate) fn numpy_permutation<T>(items: &mut [T], seed: u32) {
    let mut rng = Mt19937::new(seed);
    for i in (1..items.len()).rev() {
        let max = i as u32;
        let mask = u32::MAX >> max.leading_zeros();
        let j = loop {
            let v = rng.next_u32() & mask;
            if v <= max {
                break v;
            }
        };
        items.swap(i, j as usize);
    }
}

/// The Mersenne Twister MT19937 (Matsumoto and Nishimura), seeded as `init_genrand` seeds it.
struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { state, next: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.next == 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.next = 0;
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference implementation's first outputs for seed 5489 (mt19937ar.c's default), and
    /// numpy 2.4's `RandomState(42).permutation` (`[list(np.random.RandomState(42).permutation(n)) for n in range(1, 9)]`).
    #[test]
    fn mt19937_and_numpy_permutation() {
        let mut mt = Mt19937::new(5489);
        let first: Vec<u32> = (0..3).map(|_| mt.next_u32()).collect();
        assert_eq!(first, [3_499_211_612, 581_869_302, 3_890_346_734]);
        let want: [&[usize]; 8] = [
            &[0],
            &[1, 0],
            &[0, 1, 2],
            &[1, 3, 0, 2],
            &[1, 4, 2, 0, 3],
            &[0, 1, 5, 2, 4, 3],
            &[0, 1, 5, 2, 4, 3, 6],
            &[1, 5, 0, 7, 2, 4, 3, 6],
        ];
        for w in want {
            let mut v: Vec<usize> = (0..w.len()).collect();
            numpy_permutation(&mut v, 42);
            assert_eq!(v, w, "n = {}", w.len());
        }
    }
}
