//! The builtin corpus: deterministic, English-like short stories generated in code.
//!
//! Each story introduces invented people, a pet and towns early and refers back to them later
//! (events, arithmetic about their things, questions answered at the end). The names are made
//! of random syllables, so a model cannot memorise them: to predict them it must look back in
//! context, which is what makes attention and context length matter even at CPU scale.
//! Training and validation come from separate seeds: no story is in both.

use crate::Split;
use crate::loader::Rng;

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ra", "ten", "vo", "shi", "an", "del", "ru", "bel", "tor", "ny", "sa", "fen",
    "qui", "li", "mar", "zo", "pe", "dra", "ul", "ko", "ves", "ha", "rin", "to", "el", "gam", "se",
];
const TOWN_ENDINGS: &[&str] = &["ton", "ford", "vale", "mere", "by", "wick", "stead", "port"];
const JOBS: &[&str] = &[
    "baker",
    "teacher",
    "sailor",
    "painter",
    "doctor",
    "farmer",
    "weaver",
    "clockmaker",
    "librarian",
    "carpenter",
    "gardener",
    "potter",
    "miner",
    "singer",
    "cook",
    "builder",
];
const PETS: &[&str] = &[
    "dog", "cat", "goat", "parrot", "horse", "rabbit", "owl", "turtle",
];
const COLORS: &[&str] = &[
    "brown", "black", "white", "grey", "red", "golden", "spotted", "striped",
];
const PLACES: &[&str] = &[
    "market", "harbour", "library", "mill", "bakery", "school", "square", "station", "garden",
    "bridge",
];
const ITEMS: &[&str] = &[
    "apple", "coin", "stone", "book", "candle", "shell", "letter", "key", "pear", "feather",
];
const RELATIONS: &[&str] = &[
    "friend",
    "sister",
    "brother",
    "cousin",
    "neighbour",
    "teacher",
];
const DAYS: &[&str] = &[
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const WEATHER: &[&str] = &["rained", "snowed", "was windy", "was hot", "was foggy"];
const FURNITURE: &[&str] = &["table", "bed", "stairs", "bench", "window"];
const QUOTES: &[&str] = &[
    "We should leave before it gets dark.",
    "I think the old map was wrong.",
    "Have you seen my keys anywhere?",
    "The bread is better when it is warm.",
    "Let us count them again, slowly.",
    "Nobody in town knows the answer.",
];
const NUMBER_WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

struct Person {
    name: String,
    job: &'static str,
    he: &'static str,
    his: &'static str,
}

fn pick<'a>(rng: &mut Rng, items: &'a [&'a str]) -> &'a str {
    items[rng.below(items.len())]
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().collect::<String>() + chars.as_str())
        .unwrap_or_default()
}

/// A made-up name of `min` or `min + 1` syllables.
fn name(rng: &mut Rng, min: usize) -> String {
    let syllables = min + rng.below(2);
    let raw: String = (0..syllables).map(|_| pick(rng, SYLLABLES)).collect();
    capitalize(&raw)
}

fn person(rng: &mut Rng) -> Person {
    let (he, his) = if rng.below(2) == 0 {
        ("he", "his")
    } else {
        ("she", "her")
    };
    Person {
        name: name(rng, 2),
        job: pick(rng, JOBS),
        he,
        his,
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// One story.
pub fn story(rng: &mut Rng) -> String {
    let a = person(rng);
    let b = person(rng);
    let town = name(rng, 1) + pick(rng, TOWN_ENDINGS);
    let town2 = name(rng, 1) + pick(rng, TOWN_ENDINGS);
    let pet = pick(rng, PETS);
    let color = pick(rng, COLORS);
    let pet_name = name(rng, 1);
    let place = pick(rng, PLACES);
    let relation = pick(rng, RELATIONS);
    let (an, bn) = (&a.name, &b.name);

    let mut s = format!("The {} of {}\n\n", capitalize(pick(rng, ITEMS)), town);
    s += &format!(
        "{an} was {} {} who lived in {town}. {} had a {color} {pet} named {pet_name}. ",
        article(a.job),
        a.job,
        capitalize(a.he)
    );
    s += &format!(
        "{an}'s {relation} {bn} worked as {} {} at the {place} in {town2}.\n\n",
        article(b.job),
        b.job
    );
    for _ in 0..4 + rng.below(5) {
        let sentence = match rng.below(9) {
            0 => format!(
                "Every {}, {an} walked {pet_name} to the {}.",
                pick(rng, DAYS),
                pick(rng, PLACES)
            ),
            1 => {
                let item = pick(rng, ITEMS);
                let n = 3 + rng.below(15);
                let k = 1 + rng.below(n - 1);
                format!(
                    "One morning {an} found {n} {item}s near the {place}. {} gave {k} of them to {bn}, so {an} kept {} {item}s.",
                    capitalize(a.he),
                    n - k
                )
            }
            2 => format!("{bn} said to {an}, \"{}\"", pick(rng, QUOTES)),
            3 => format!(
                "When it {} in {town}, {pet_name} the {pet} slept under the {}.",
                pick(rng, WEATHER),
                pick(rng, FURNITURE)
            ),
            4 => {
                let hours = 2 + rng.below(9);
                format!(
                    "{an} and {bn} travelled from {town} to {town2}. The trip took {} hours, and {} hours back.",
                    NUMBER_WORDS[hours], NUMBER_WORDS[hours]
                )
            }
            5 => format!(
                "{bn} wrote a letter to {an} about {} old {}.",
                b.his,
                pick(rng, ITEMS)
            ),
            6 => {
                let (x, y) = (rng.below(50), rng.below(50));
                format!(
                    "At the {place}, {bn} bought {x} pears and {y} apples: {} pieces of fruit in all.",
                    x + y
                )
            }
            7 => format!(
                "The {color} {pet} belonged to {an}, and everyone in {town} knew {pet_name}."
            ),
            _ => format!(
                "As {} {}, {bn} was always busy at the {place}.",
                article(b.job),
                b.job
            ),
        };
        s += &sentence;
        s.push(if rng.below(4) == 0 { '\n' } else { ' ' });
    }
    s += "\n\n";
    let questions = [
        format!("Q: Where does {an} live?\nA: {an} lives in {town}."),
        format!("Q: What is the name of {an}'s {pet}?\nA: The {pet} is called {pet_name}."),
        format!(
            "Q: What does {bn} do?\nA: {bn} is {} {}.",
            article(b.job),
            b.job
        ),
        format!("Q: Who is {bn}?\nA: {bn} is {an}'s {relation}."),
        format!(
            "Q: What does {an} do?\nA: {an} is {} {}.",
            article(a.job),
            a.job
        ),
    ];
    let mut order: Vec<usize> = (0..questions.len()).collect();
    rng.shuffle(&mut order);
    for &q in &order[..2 + rng.below(3)] {
        s += &questions[q];
        s.push('\n');
    }
    s
}

/// Documents of `split` totalling at least `target_bytes`, the same for the same seed.
pub fn documents(seed: u64, split: Split, target_bytes: usize) -> Vec<String> {
    let stream = match split {
        Split::Train => seed,
        Split::Val => seed ^ 0x7661_6C69_6461_7465, // a separate stream for validation
    };
    let mut rng = Rng::new(stream);
    let mut docs = Vec::new();
    let mut total = 0;
    while total < target_bytes {
        let doc = story(&mut rng);
        total += doc.len();
        docs.push(doc);
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_split() {
        let a = documents(1, Split::Train, 50_000);
        assert_eq!(a, documents(1, Split::Train, 50_000));
        assert!(a.iter().map(String::len).sum::<usize>() >= 50_000);
        let val = documents(1, Split::Val, 50_000);
        assert!(val.iter().all(|v| !a.contains(v)));
        assert_ne!(a, documents(2, Split::Train, 50_000));
        // Entities introduced early come back later in the same story.
        let first = &a[0];
        let who = first
            .split("\n\n")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        assert!(first.matches(who).count() >= 3, "{first}");
    }
}
