//! Pairing codes such as `7-crossword-lantern`, in the style of
//! magic-wormhole: one person reads the code to the other, who types it.
//! The number (the nameplate) picks the rendezvous room and is all the
//! server sees; the whole code is the SPAKE2 password, so the words are the
//! secret. SPAKE2 allows an attacker one guess per pairing attempt, which is
//! why a few words (8 bits each) are enough.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use rand::seq::SliceRandom;
use rand::Rng;

/// Words per generated code unless the caller asks for more: 16 bits, so a
/// single online guess succeeds with probability 1 in 65 536.
pub const DEFAULT_WORDS: usize = 2;

/// Shown in every parse error, so the user sees the expected form.
const EXAMPLE: &str = "7-crossword-lantern";

/// The words codes are generated from (`code/wordlist.txt`, which says how
/// they were chosen); parsing accepts any words.
static WORDLIST: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    include_str!("code/wordlist.txt")
        .lines()
        .filter(|line| !line.starts_with('#'))
        .collect()
});

/// A pairing code: a nameplate and one or more words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingCode {
    nameplate: u16,
    words: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed code {code:?}: {problem}, like {}", EXAMPLE)]
pub struct MalformedCode {
    code: String,
    problem: &'static str,
}

impl PairingCode {
    /// A new code of `words` random words from the word list.
    ///
    /// # Panics
    ///
    /// If `nameplate` is 0 or `words` is 0: such a code could not be parsed
    /// back.
    pub fn generate<R: Rng + ?Sized>(nameplate: u16, words: usize, rng: &mut R) -> PairingCode {
        assert!(nameplate != 0, "nameplate 0 is not a valid code");
        assert!(words != 0, "a code needs at least one word");
        let words = (0..words)
            .map(|_| WORDLIST.choose(rng).expect("the word list is not empty"))
            .map(|word| word.to_string())
            .collect();
        PairingCode { nameplate, words }
    }

    pub fn nameplate(&self) -> u16 {
        self.nameplate
    }

    /// The rendezvous room: only the nameplate, so the server never learns
    /// the secret words.
    pub fn room(&self) -> Vec<u8> {
        format!("n-{}", self.nameplate).into_bytes()
    }

    /// The SPAKE2 password: the whole code in its canonical form, so both
    /// sides derive the same bytes however the code was typed.
    pub fn password(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

/// A nameplate for a new code: 1 to 999, short to type. Two pairings that
/// pick the same nameplate at once on one server collide (the room holds
/// two), and the later one is told the room is full and can retry.
pub fn random_nameplate<R: Rng + ?Sized>(rng: &mut R) -> u16 {
    rng.gen_range(1..=999)
}

impl FromStr for PairingCode {
    type Err = MalformedCode;

    /// Accepts `<number>-<word>[-<word>...]`: the number 1 to 65535 without
    /// leading zeros, words of ASCII letters and digits. Surrounding
    /// whitespace is ignored and letters are lowercased, so a code pasted
    /// with a newline or typed with capitals still matches.
    fn from_str(code: &str) -> Result<PairingCode, MalformedCode> {
        let malformed = |problem| MalformedCode {
            code: code.into(),
            problem,
        };
        let normalized = code.trim().to_ascii_lowercase();
        let mut parts = normalized.split('-');
        let number = parts.next().unwrap_or_default();
        let words: Vec<String> = parts.map(String::from).collect();
        if number.is_empty() || words.is_empty() {
            return Err(malformed("expected a number and at least one word"));
        }
        let nameplate = number
            .parse::<u16>()
            .ok()
            .filter(|&n| n != 0 && !number.starts_with(['0', '+']))
            .ok_or_else(|| malformed("the number must be 1 to 65535, without leading zeros"))?;
        let plain = |word: &String| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        if !words.iter().all(plain) {
            return Err(malformed(
                "words are letters and digits, separated by single dashes",
            ));
        }
        Ok(PairingCode { nameplate, words })
    }
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.nameplate)?;
        for word in &self.words {
            write!(f, "-{word}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn the_word_list_has_256_distinct_short_lowercase_words() {
        assert_eq!(WORDLIST.len(), 256);
        let distinct: HashSet<&str> = WORDLIST.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        for word in WORDLIST.iter() {
            assert!(
                (3..=8).contains(&word.len()) && word.bytes().all(|b| b.is_ascii_lowercase()),
                "{word:?}"
            );
        }
        let prefixes: HashSet<&str> = WORDLIST.iter().map(|word| &word[..3]).collect();
        assert_eq!(
            prefixes.len(),
            256,
            "no two words share their first three letters"
        );
    }

    #[test]
    fn codes_print_and_parse_back() {
        for text in ["7-crossword-lantern", "1-a", "65535-x-y-z-0", "999-abc123"] {
            let code: PairingCode = text.parse().unwrap();
            assert_eq!(code.to_string(), text);
        }
        let code: PairingCode = "42-apple-robot".parse().unwrap();
        assert_eq!(code.nameplate(), 42);
        assert_eq!(code.room(), b"n-42");
        assert_eq!(code.password(), b"42-apple-robot");
    }

    #[test]
    fn capitals_and_surrounding_whitespace_are_forgiven() {
        let code: PairingCode = "  7-Crossword-LANTERN\n".parse().unwrap();
        assert_eq!(code.to_string(), "7-crossword-lantern");
        assert_eq!(code.password(), b"7-crossword-lantern");
    }

    #[test]
    fn malformed_codes_are_refused_with_an_example() {
        for bad in [
            "",
            "foo",
            "7",
            "7-",
            "-apple",
            "0-apple",
            "07-apple",
            "+7-apple",
            "65536-apple",
            "x7-apple",
            "7--apple",
            "7-apple-",
            "7-app le",
            "7-apple_pie",
            "7-äpple",
            "7 apple",
        ] {
            let error = bad.parse::<PairingCode>().unwrap_err();
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("malformed code {bad:?}: ")),
                "{message}"
            );
            assert!(message.ends_with(", like 7-crossword-lantern"), "{message}");
        }
        assert_eq!(
            "foo".parse::<PairingCode>().unwrap_err().to_string(),
            "malformed code \"foo\": expected a number and at least one word, like 7-crossword-lantern"
        );
    }

    #[test]
    fn generated_codes_use_the_word_list_and_parse_back() {
        let mut rng = StdRng::seed_from_u64(7);
        let code = PairingCode::generate(7, DEFAULT_WORDS, &mut rng);
        assert_eq!(code.nameplate(), 7);
        assert_eq!(code.words.len(), 2);
        assert!(code
            .words
            .iter()
            .all(|word| WORDLIST.contains(&word.as_str())));
        assert_eq!(code.to_string().parse::<PairingCode>(), Ok(code.clone()));

        let long = PairingCode::generate(65535, 5, &mut rng);
        assert_eq!(long.words.len(), 5);
        assert_eq!(long.to_string().parse::<PairingCode>(), Ok(long));

        let codes: HashSet<String> = (0..100)
            .map(|_| PairingCode::generate(1, 2, &mut rng).to_string())
            .collect();
        assert!(codes.len() > 90, "codes are random: {}", codes.len());
    }

    #[test]
    #[should_panic(expected = "at least one word")]
    fn a_code_without_words_cannot_be_generated() {
        PairingCode::generate(7, 0, &mut StdRng::seed_from_u64(0));
    }

    #[test]
    fn random_nameplates_are_one_to_three_digits() {
        let mut rng = StdRng::seed_from_u64(1);
        let nameplates: HashSet<u16> = (0..10_000).map(|_| random_nameplate(&mut rng)).collect();
        assert!(nameplates.iter().all(|n| (1..=999).contains(n)));
        assert!(nameplates.contains(&1) && nameplates.contains(&999));
    }
}
