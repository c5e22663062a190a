//! Phone numbers: every number that enters suppressd (webhook, lookup, import) is turned into its
//! E.164 form here, so that `004911113333444`, `+49 111 13333444` and `+4911113333444` are one key.
//!
//! The rule is deliberately looser than libphonenumber's validity check — providers send numbers
//! that are not "valid" per numbering-plan metadata (the LOX24 example `+4911113333444` is one) and
//! an opt-out must never be dropped for that. A string is a phone number when, after removing
//! spaces, dashes, dots, parentheses and a `(0)` trunk digit and turning a leading `00` into `+`,
//! it is `+` followed by 7–15 digits that start with a known country calling code. Only a number
//! without any country code needs real numbering-plan knowledge (`--default-region`), and that is
//! the one case handed to the `phonenumber` crate.
//!
//! Lookups call this on their hot path, so input that is already E.164 is checked with a few byte
//! comparisons and a table lookup, and never allocates more than the returned string.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::LazyLock;

use phonenumber::country;

/// Digits in an E.164 number, country code included.
const MIN_DIGITS: usize = 7;
const MAX_DIGITS: usize = 15;

/// Why a string is not a phone number; the message is shown to API clients as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("phone number contains {0:?}, which is not a digit or a separator")]
    InvalidCharacter(char),
    #[error("phone number has no country code (use +CC or 00CC, or start suppressd with --default-region)")]
    NoCountryCode,
    #[error("phone number does not start with a known country calling code")]
    UnknownCountryCode,
    #[error("phone number must have 7 to 15 digits including the country code, found {0}")]
    Length(usize),
    #[error("phone number cannot be read as a national number of region {0}")]
    National(String),
}

/// Which 1–3 digit prefixes are assigned country calling codes. E.164 country codes form a prefix
/// code, so at most one of a number's first three prefixes can match.
static COUNTRY_CODES: LazyLock<[bool; 1000]> = LazyLock::new(|| {
    let mut known = [false; 1000];
    for (code, slot) in known.iter_mut().enumerate().skip(1) {
        let Ok(code) = u16::try_from(code) else {
            continue;
        };
        *slot = phonenumber::metadata::DATABASE.by_code(&code).is_some();
    }
    known
});

/// Turns user and provider input into E.164.
#[derive(Debug, Clone, Default)]
pub struct Normalizer {
    default_region: Option<country::Id>,
}

impl Normalizer {
    /// `default_region` is an ISO 3166 alpha-2 code such as `DE`; numbers without a country code
    /// are read as national numbers of that region.
    pub fn new(default_region: Option<&str>) -> Result<Self, String> {
        let default_region = match default_region {
            None => None,
            Some(code) => Some(
                country::Id::from_str(&code.trim().to_ascii_uppercase()).map_err(|_| {
                    format!("--default-region {code:?} is not a known ISO 3166 alpha-2 region")
                })?,
            ),
        };
        Ok(Self { default_region })
    }

    /// Loads the numbering-plan metadata (about 150 ms) so that the first request does not pay
    /// for it.
    pub fn warm(&self) {
        LazyLock::force(&COUNTRY_CODES);
    }

    /// The E.164 form of `input`, or why it is not a phone number.
    pub fn normalize(&self, input: &str) -> Result<String, PhoneError> {
        self.normalize_borrowed(input).map(Cow::into_owned)
    }

    /// Like [`Normalizer::normalize`], without allocating when `input` is already E.164 (the
    /// bulk-check hot path).
    pub fn normalize_borrowed<'a>(&self, input: &'a str) -> Result<Cow<'a, str>, PhoneError> {
        let trimmed = input.trim();
        if let Some(digits) = trimmed.strip_prefix('+') {
            if digits.bytes().all(|b| b.is_ascii_digit()) {
                check_digits(digits)?;
                return Ok(Cow::Borrowed(trimmed));
            }
        }
        self.normalize_slow(trimmed).map(Cow::Owned)
    }

    fn normalize_slow(&self, trimmed: &str) -> Result<String, PhoneError> {
        let without_trunk = trimmed.replace("(0)", "");
        let mut plus = false;
        let mut digits = String::with_capacity(without_trunk.len());
        for c in without_trunk.chars() {
            match c {
                '0'..='9' => digits.push(c),
                '+' if !plus && digits.is_empty() => plus = true,
                '-' | '.' | '(' | ')' => {}
                c if c.is_whitespace() => {}
                c => return Err(PhoneError::InvalidCharacter(c)),
            }
        }
        if digits.is_empty() {
            return Err(PhoneError::Empty);
        }
        let international = if plus {
            Some(digits.as_str())
        } else {
            digits.strip_prefix("00")
        };
        match international {
            Some(international) => {
                check_digits(international)?;
                Ok(format!("+{international}"))
            }
            None => self.national(&digits),
        }
    }

    fn national(&self, digits: &str) -> Result<String, PhoneError> {
        let region = self.default_region.ok_or(PhoneError::NoCountryCode)?;
        let parsed = phonenumber::parse(Some(region), digits)
            .map_err(|_| PhoneError::National(region.as_ref().to_owned()))?;
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        match e164.strip_prefix('+') {
            Some(international) => {
                check_digits(international)?;
                Ok(e164)
            }
            None => Err(PhoneError::National(region.as_ref().to_owned())),
        }
    }
}

/// `digits` are the ASCII digits after the `+`.
fn check_digits(digits: &str) -> Result<(), PhoneError> {
    if !(MIN_DIGITS..=MAX_DIGITS).contains(&digits.len()) {
        return Err(PhoneError::Length(digits.len()));
    }
    let bytes = digits.as_bytes();
    if bytes[0] == b'0' {
        return Err(PhoneError::UnknownCountryCode);
    }
    let mut prefix = 0usize;
    for &b in &bytes[..3] {
        prefix = prefix * 10 + usize::from(b - b'0');
        if COUNTRY_CODES[prefix] {
            return Ok(());
        }
    }
    Err(PhoneError::UnknownCountryCode)
}

/// The digits of an E.164 number as an integer, for keeping many numbers compactly (at most 15
/// digits fit a `u64`, and no E.164 number starts with 0, so the integer is unambiguous); `None`
/// for anything that is not `+` and 1–15 digits.
pub fn e164_digits(e164: &str) -> Option<u64> {
    let digits = e164.strip_prefix('+')?;
    if digits.is_empty() || digits.len() > MAX_DIGITS {
        return None;
    }
    digits.bytes().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_numbers_map_to_integers() {
        assert_eq!(e164_digits("+4911113333444"), Some(4_911_113_333_444));
        assert_eq!(e164_digits("+999999999999999"), Some(999_999_999_999_999));
        assert_eq!(e164_digits("4911113333444"), None);
        assert_eq!(e164_digits("+49a"), None);
        assert_eq!(e164_digits("+1234567890123456"), None);
    }

    fn plain() -> Normalizer {
        Normalizer::default()
    }

    #[test]
    fn spellings_of_one_number_share_one_key() {
        let n = plain();
        for input in [
            "+4911113333444",
            "004911113333444",
            "+49 111 13333444",
            " +49-111-133.334.44 ",
        ] {
            assert_eq!(
                n.normalize(input).as_deref(),
                Ok("+4911113333444"),
                "{input}"
            );
        }
        for input in [
            "+49 (0)30 1234567",
            "+4930 1234567",
            "0049 (0) 30 123 4567",
            "+49301234567",
        ] {
            assert_eq!(n.normalize(input).as_deref(), Ok("+49301234567"), "{input}");
        }
    }

    #[test]
    fn numbering_plan_validity_is_not_required() {
        assert_eq!(
            plain().normalize("+4911113333444").as_deref(),
            Ok("+4911113333444")
        );
        assert_eq!(
            plain().normalize("+436766304011").as_deref(),
            Ok("+436766304011")
        );
        assert_eq!(
            plain().normalize("+12025550123").as_deref(),
            Ok("+12025550123")
        );
    }

    #[test]
    fn rejects_what_is_not_a_phone_number() {
        let n = plain();
        assert_eq!(n.normalize(""), Err(PhoneError::Empty));
        assert_eq!(
            n.normalize("+49 CALL NOW"),
            Err(PhoneError::InvalidCharacter('C'))
        );
        assert_eq!(
            n.normalize("1-800-FLOWERS"),
            Err(PhoneError::InvalidCharacter('F'))
        );
        assert_eq!(n.normalize("030 1234567"), Err(PhoneError::NoCountryCode));
        assert_eq!(n.normalize("+49123"), Err(PhoneError::Length(5)));
        assert_eq!(
            n.normalize("+4912345678901234"),
            Err(PhoneError::Length(16))
        );
        assert_eq!(
            n.normalize("+0123456789"),
            Err(PhoneError::UnknownCountryCode)
        );
        assert_eq!(
            n.normalize("+28012345678"),
            Err(PhoneError::UnknownCountryCode)
        );
        assert_eq!(
            n.normalize("+49+1234567"),
            Err(PhoneError::InvalidCharacter('+'))
        );
    }

    #[test]
    fn default_region_reads_national_numbers() {
        let de = Normalizer::new(Some("DE")).expect("DE is a region");
        assert_eq!(de.normalize("030 1234567").as_deref(), Ok("+49301234567"));
        assert_eq!(
            de.normalize("(030) 123-4567").as_deref(),
            Ok("+49301234567")
        );
        assert_eq!(
            de.normalize("+44 20 7946 0958").as_deref(),
            Ok("+442079460958")
        );
        assert!(Normalizer::new(Some("XX")).is_err());
    }
}
