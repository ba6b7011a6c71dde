//! What the clients of a load level send: each client holds conversations, one after another,
//! and sends each conversation's turns in order, every request carrying the whole history (what
//! chat UIs and agent frameworks send). The scenarios are the traffic real deployments see.

use serde::Serialize;
use serde_json::{Value, json};

/// A kind of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every request a short chat of its own.
    Distinct,
    /// Every request the same long system prompt (instructions, tool descriptions, a persona;
    /// about 1,500 tokens), then a short question of its own.
    SharedSystem,
    /// Each client one conversation of [`TURNS`] turns, each request the history so far with
    /// the replies the server gave.
    MultiTurn,
    /// A quarter of the clients send a document of about 2,000 tokens to summarise, the others
    /// short chats: does a long prefill stall the others' tokens?
    LongPrompt,
    /// Code to rewrite with a name changed: replies that repeat much of their prompt, where
    /// prompt lookup drafts well (for `--speculative`; not in the default run).
    Rewrite,
    /// Short chats of their own, half the clients with the LoRA adapter both servers load
    /// (`lora` at scale 1), half without (scale 0): two adapter configurations at once, which
    /// llama.cpp cannot decode together (not in the default run: it needs an adapter).
    Lora,
}

/// Turns of a `multi-turn` conversation.
pub const TURNS: usize = 6;

/// One conversation: an optional system prompt, then the user's turns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<String>,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Distinct => "distinct",
            Scenario::SharedSystem => "shared-system",
            Scenario::MultiTurn => "multi-turn",
            Scenario::LongPrompt => "long-prompt",
            Scenario::Rewrite => "rewrite",
            Scenario::Lora => "lora",
        }
    }

    /// The `lora` field client `client` sends (llama-server's per-request adapter scales), if
    /// any: in `lora`, scale 1 for even clients and 0 for odd ones.
    pub fn lora(self, client: usize) -> Option<Value> {
        (self == Scenario::Lora).then(|| json!([{ "id": 0, "scale": if client.is_multiple_of(2) { 1.0 } else { 0.0 } }]))
    }

    /// The client counts this scenario runs at: `distinct` at the levels asked for, the others
    /// where they tell something (several slots busy, and more clients than slots).
    pub fn levels(self, distinct: &[usize]) -> Vec<usize> {
        match self {
            Scenario::Distinct => distinct.to_vec(),
            Scenario::SharedSystem => vec![8, 16],
            Scenario::MultiTurn => vec![4, 8],
            Scenario::LongPrompt => vec![8],
            Scenario::Rewrite => vec![1, 4, 8, 16],
            Scenario::Lora => vec![2, 4, 8],
        }
    }

    /// What client `client` sends: `per_client` conversations (`multi-turn`: one, of [`TURNS`]
    /// turns).
    pub fn conversations(self, client: usize, per_client: usize) -> Vec<Conversation> {
        let question = |k: usize| SHORT_PROMPTS[(client + k) % SHORT_PROMPTS.len()].to_string();
        match self {
            Scenario::Distinct | Scenario::Lora => (0..per_client).map(|k| Conversation { system: None, turns: vec![question(k)] }).collect(),
            Scenario::SharedSystem => (0..per_client)
                .map(|k| Conversation {
                    system: Some(shared_system_prompt()),
                    // Distinct questions: client and request named, so no two prompts are equal.
                    turns: vec![format!("Customer {client}, request {k}: {}", question(k))],
                })
                .collect(),
            Scenario::MultiTurn => {
                let mut turns = vec![question(0)];
                turns.extend(FOLLOW_UPS.iter().take(TURNS - 1).map(|t| t.to_string()));
                vec![Conversation { system: None, turns }]
            }
            Scenario::LongPrompt => (0..per_client)
                .map(|k| {
                    let turn = if client.is_multiple_of(4) {
                        format!("{}\n\nSummarise the report above in a few sentences.", long_document(client + k))
                    } else {
                        question(k)
                    };
                    Conversation { system: None, turns: vec![turn] }
                })
                .collect(),
            Scenario::Rewrite => (0..per_client)
                .map(|k| {
                    let (old, new) = RENAMES[(client + k) % RENAMES.len()];
                    let code = REWRITE_CODE.replace("{name}", old);
                    let turn =
                        format!("Rewrite this Python code with `{old}` renamed to `{new}`. Answer with the code only.\n\n```python\n{code}```");
                    Conversation { system: None, turns: vec![turn] }
                })
                .collect(),
        }
    }
}

/// The code `rewrite` asks to rename a variable in (`{name}`: the variable).
const REWRITE_CODE: &str = "def summarize(orders):
    {name} = {}
    for order in orders:
        key = (order.customer, order.month)
        if key not in {name}:
            {name}[key] = {\"count\": 0, \"total\": 0.0, \"items\": []}
        {name}[key][\"count\"] += 1
        {name}[key][\"total\"] += order.amount
        {name}[key][\"items\"].extend(order.items)
    report = []
    for (customer, month), entry in sorted({name}.items()):
        average = entry[\"total\"] / entry[\"count\"]
        report.append(f\"{customer} {month}: {entry['count']} orders, {average:.2f} each\")
    return report
";

/// Names `rewrite` renames, one pair per client (cycled).
const RENAMES: [(&str, &str); 4] = [("acc", "totals"), ("groups", "by_key"), ("table", "summary"), ("seen", "buckets")];

/// Short chats, one per client (cycled).
const SHORT_PROMPTS: [&str; 8] = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle to a child.",
    "List some tips for learning a new language.",
    "What makes a good cup of tea?",
    "Tell me about the history of paper.",
    "Why do cats purr?",
    "Summarise the rules of chess.",
];

/// A conversation's later turns.
const FOLLOW_UPS: [&str; TURNS - 1] = [
    "Can you say more about that?",
    "Give me an example.",
    "What would a beginner get wrong?",
    "How would you explain it in one sentence?",
    "Thanks. Anything else I should know?",
];

/// The system prompt every `shared-system` request starts with: a support assistant's rules
/// and tools, about 1,500 tokens, the same text on every call.
pub fn shared_system_prompt() -> String {
    let mut text = String::from(
        "You are Aria, the support assistant of Northwind Outfitters, a shop for hiking and camping gear. \
         Be friendly, precise and brief. Follow every rule below.\n\n",
    );
    let mut words = Words::new(7);
    for rule in 1..=46 {
        text += &format!("Rule {rule}: {}.\n", words.sentence(22));
    }
    text += "\nTools you may call:\n";
    for (name, what) in [("lookup_order", "order id"), ("check_stock", "product code"), ("store_hours", "city"), ("open_ticket", "summary")] {
        text += &format!("- {name}({what}): {}.\n", words.sentence(16));
    }
    text
}

/// A report of about 2,000 tokens, different for each `seed`.
pub fn long_document(seed: usize) -> String {
    let mut words = Words::new(1000 + seed as u64);
    (0..12)
        .map(|p| format!("Section {}. {}", p + 1, (0..6).map(|_| words.sentence(18) + ".").collect::<Vec<_>>().join(" ")))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Plain English words in a fixed pseudo-random order: text of a known size whose tokens a
/// model's cache cannot have seen, the same on every run.
struct Words(u64);

const VOCABULARY: [&str; 48] = [
    "the", "customer", "order", "always", "check", "before", "answer", "shipping", "return", "within", "days", "tent", "boots", "jacket", "weather",
    "trail", "warranty", "refund", "store", "staff", "never", "promise", "price", "stock", "size", "colour", "map", "season", "backpack", "stove",
    "water", "filter", "careful", "friendly", "explain", "policy", "receipt", "exchange", "delivery", "address", "mountain", "river", "camp",
    "night", "light", "weight", "repair", "guide",
];

impl Words {
    fn new(seed: u64) -> Words {
        Words(seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407))
    }

    fn next(&mut self) -> &'static str {
        // A 64-bit LCG (Knuth's MMIX constants); its high bits pick the word.
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        VOCABULARY[(self.0 >> 33) as usize % VOCABULARY.len()]
    }

    /// `n` words, the first capitalised.
    fn sentence(&mut self, n: usize) -> String {
        let mut s: String = (0..n).map(|_| self.next()).collect::<Vec<_>>().join(" ");
        if let Some(first) = s.get_mut(0..1) {
            first.make_ascii_uppercase();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_of_a_shared_system_level_starts_alike_and_differs_after() {
        let prompts: Vec<Conversation> = (0..16).flat_map(|c| Scenario::SharedSystem.conversations(c, 2)).collect();
        assert!(prompts.iter().all(|p| p.system.as_deref() == Some(shared_system_prompt().as_str())));
        let mut questions: Vec<&str> = prompts.iter().map(|p| p.turns[0].as_str()).collect();
        questions.sort_unstable();
        questions.dedup();
        assert_eq!(questions.len(), 32, "every question distinct");
        // About 1,500 tokens: roughly 1.2 tokens a word for such text.
        let words = shared_system_prompt().split_whitespace().count();
        assert!((1050..1300).contains(&words), "{words} words");
    }

    #[test]
    fn long_prompts_go_to_a_quarter_of_the_clients_and_differ() {
        let long: Vec<usize> = (0..8).filter(|&c| Scenario::LongPrompt.conversations(c, 1)[0].turns[0].len() > 5000).collect();
        assert_eq!(long, vec![0, 4]);
        assert_ne!(long_document(0), long_document(4));
        let words = long_document(0).split_whitespace().count();
        assert!((1300..1900).contains(&words), "{words} words");
        assert_eq!(Scenario::MultiTurn.conversations(3, 2), Scenario::MultiTurn.conversations(3, 5), "one conversation whatever per_client says");
        assert_eq!(Scenario::MultiTurn.conversations(3, 1)[0].turns.len(), TURNS);
    }

    #[test]
    fn half_the_lora_clients_ask_for_the_adapter_and_the_others_for_none() {
        let scales: Vec<f64> = (0..4).map(|c| Scenario::Lora.lora(c).unwrap()[0]["scale"].as_f64().unwrap()).collect();
        assert_eq!(scales, [1.0, 0.0, 1.0, 0.0]);
        assert_eq!(Scenario::Distinct.lora(0), None);
        assert_eq!(Scenario::Lora.conversations(3, 2), Scenario::Distinct.conversations(3, 2), "the same chats as distinct");
    }

    #[test]
    fn a_rewrite_names_the_variable_its_code_uses() {
        for (client, (old, new)) in RENAMES.iter().enumerate() {
            let turn = &Scenario::Rewrite.conversations(client, 1)[0].turns[0];
            assert!(turn.contains(&format!("    {old} = {{}}")) && turn.contains(&format!("`{new}`")), "{turn}");
            assert!(!turn.contains("{name}"));
        }
    }
}
