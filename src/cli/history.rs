//! `natter history NAME`: the lines of the chat with a contact, from the
//! history database.

use anyhow::{bail, Context, Result};
use natter::chat::{ChatStore, FILE_NAME};
use natter::contacts::Contacts;
use natter::identity::{config_dir, PublicKey};

use super::chat::now_ms;

pub fn run(name: &str, since: Option<&str>) -> Result<()> {
    let home = config_dir()?;
    let contacts = Contacts::load(&home)?;
    let peer = match contacts.get(name) {
        Some(key) => key,
        None => PublicKey::from_hex(name).map_err(|_| {
            anyhow::anyhow!("no contact named {name:?} (and it is not a public key); `natter contacts list` shows them")
        })?,
    };
    let since_ms = match since {
        Some(text) => parse_since(text, now_ms())?,
        None => 0,
    };
    let path = home.join(FILE_NAME);
    if !path.exists() {
        return Ok(());
    }
    // Reading only: whether history is kept does not matter here.
    let store = ChatStore::open(&path, true)?;
    for line in store.lines(&peer, since_ms)? {
        let (who, at, state) = if line.outgoing {
            let state = match line.delivered_ms {
                Some(at) => format!("  (delivered {})", date_time(at)),
                None => "  (not delivered yet)".to_owned(),
            };
            ("me", line.typed_at_ms, state)
        } else {
            (
                name,
                line.arrived_ms.unwrap_or(line.typed_at_ms),
                String::new(),
            )
        };
        println!("{}  {who}: {}{state}", date_time(at), line.text);
    }
    Ok(())
}

/// `2026-12-04`, `2026-12-04T09:30[:15]` (UTC) or `90m` / `12h` / `7d` /
/// `30s` ago, as ms since the Unix epoch.
fn parse_since(text: &str, now_ms: u64) -> Result<u64> {
    let ago = |unit_ms: u64| -> Result<u64> {
        let count: u64 = text[..text.len() - 1].parse().context("not a number")?;
        Ok(now_ms.saturating_sub(count * unit_ms))
    };
    match text.chars().last() {
        Some('s') => return ago(1000),
        Some('m') => return ago(60_000),
        Some('h') => return ago(3_600_000),
        Some('d') => return ago(86_400_000),
        _ => {}
    }
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00"));
    let numbers = |part: &str, sep: char| -> Option<Vec<u64>> {
        part.split(sep).map(|n| n.parse().ok()).collect()
    };
    let (Some(date), Some(time)) = (numbers(date, '-'), numbers(time, ':')) else {
        bail!("--since {text:?}: expected 2026-12-04, 2026-12-04T09:30 or a time ago such as 12h");
    };
    let (&[year, month, day], &[hour, minute, ref rest @ ..]) = (&date[..], &time[..]) else {
        bail!("--since {text:?}: expected 2026-12-04, 2026-12-04T09:30 or a time ago such as 12h");
    };
    let second = match rest {
        [] => 0,
        [second] => *second,
        _ => bail!("--since {text:?}: not a date and time"),
    };
    if year < 1970
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        bail!("--since {text:?}: not a date and time");
    }
    let days = days_from_civil(year, month, day);
    Ok(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000)
}

/// Days from 1970-01-01 to a date (proleptic Gregorian; H. Hinnant's
/// algorithm).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-04 09:30:15` (UTC).
fn date_time(ms: u64) -> String {
    let seconds = ms / 1000;
    let days = seconds / 86_400;
    // The inverse of days_from_civil.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_ago_parse_and_print() {
        let now = 1_764_840_000_000; // 2025-12-04 09:20:00 UTC
        assert_eq!(date_time(now), "2025-12-04 09:20:00");
        assert_eq!(parse_since("2025-12-04T09:20", now).unwrap(), now);
        assert_eq!(
            parse_since("2025-12-04", now).unwrap(),
            now - (9 * 60 + 20) * 60_000
        );
        assert_eq!(parse_since("90m", now).unwrap(), now - 90 * 60_000);
        assert_eq!(parse_since("2d", now).unwrap(), now - 2 * 86_400_000);
        assert_eq!(
            date_time(parse_since("2024-02-29T23:59:59", now).unwrap()),
            "2024-02-29 23:59:59"
        );
        for bad in [
            "yesterday",
            "2025-13-01",
            "2025-12-04T25:00",
            "xh",
            "2025-12",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
