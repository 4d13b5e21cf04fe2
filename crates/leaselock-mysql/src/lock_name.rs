//! How a namespace prefix and a key become a `GET_LOCK` name.

use sha2::{Digest, Sha256};

/// The longest lock name MySQL accepts (MySQL 8 rejects longer names; MariaDB accepts them, but
/// the scheme keeps to the common limit).
pub const MAX_LOCK_NAME_LEN: usize = 64;

/// How many hex digits of the SHA-256 digest a hashed name carries (64 bits).
const HASH_HEX_DIGITS: usize = 16;

/// Characters a plain name may contain. MySQL compares lock names case-insensitively (MariaDB
/// 10.11 compares them exactly), so plain names are lower-case ASCII only: then both servers, and
/// every collation, see the same name.
fn is_plain(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '_' | '-' | '.' | '/' | ':')
}

/// The `GET_LOCK` name for `key` under `prefix`: a stable, documented mapping that users can
/// inspect (for example in `performance_schema.metadata_locks`, or with `IS_USED_LOCK`).
///
/// `prefix` is the backend's prefix, a [`leaselock::Namespace`] identifier (so it has no `:`);
/// the full name is `prefix:key`.
///
/// * When it has at most 64 characters, all lower-case ASCII letters, digits or `_ - . / :`, the
///   lock name is exactly that.
/// * Otherwise the lock name is a readable part (the first 47 characters of `prefix:key`,
///   upper-case letters lowered and every other character outside that set replaced with `_`),
///   then `#`, then the first 16 hex digits of the SHA-256 of the full `prefix:key` in UTF-8.
///
/// Plain names never contain `#`, so a hashed name never equals a plain one; two hashed names are
/// equal only if their full names' digests agree in 64 bits. So keys longer than 64 characters,
/// keys that differ only after the 64th character, keys that differ only in case or in non-ASCII
/// characters all get distinct lock names, on MySQL (case-insensitive names) and MariaDB alike.
/// The mapping never changes between releases of this crate: processes of different versions
/// exclude each other.
///
/// ```
/// use leaselock_mysql::lock_name;
/// assert_eq!(lock_name("leaselock", "migrations"), "leaselock:migrations");
/// assert_eq!(
///     lock_name("leaselock", "Migrations"),
///     "leaselock:migrations#87abf4a5a8f7b086"
/// );
/// let long = "reports/".repeat(10);
/// assert_eq!(
///     lock_name("leaselock", &long),
///     "leaselock:reports/reports/reports/reports/repor#5d500b36af778329"
/// );
/// assert!(lock_name("leaselock", &long).len() <= 64);
/// ```
pub fn lock_name(prefix: &str, key: &str) -> String {
    let full = format!("{prefix}:{key}");
    if full.len() <= MAX_LOCK_NAME_LEN && full.chars().all(is_plain) {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let mut name: String = full
        .chars()
        .take(MAX_LOCK_NAME_LEN - HASH_HEX_DIGITS - 1)
        .map(|c| {
            if is_plain(c) {
                c
            } else if c.is_ascii_uppercase() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.push('#');
    for byte in &digest[..HASH_HEX_DIGITS / 2] {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_kept() {
        assert_eq!(lock_name("p", "a/b.c-d_e:f"), "p:a/b.c-d_e:f");
        let exactly = "k".repeat(MAX_LOCK_NAME_LEN - 2);
        assert_eq!(lock_name("p", &exactly), format!("p:{exactly}"));
    }

    #[test]
    fn hashed_names_are_short_ascii_and_distinct() {
        let base = "x".repeat(200);
        let names: Vec<String> = [
            format!("{base}1"),
            format!("{base}2"),
            "Key".to_owned(),
            "key ".to_owned(),
            "ключ-é".to_owned(),
            "ключ-e".to_owned(),
            "a#0000000000000000".to_owned(),
            "x".repeat(63),
        ]
        .iter()
        .map(|k| lock_name("leaselock", k))
        .collect();
        for (i, a) in names.iter().enumerate() {
            assert!(a.len() <= MAX_LOCK_NAME_LEN, "{a}");
            assert!(a.is_ascii(), "{a}");
            assert_eq!(a.to_ascii_lowercase(), *a, "{a}");
            assert_eq!(a.matches('#').count(), 1, "{a}");
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_ne!(lock_name("leaselock", "key"), lock_name("leaselock", "Key"));
        // Prefixes are identifiers (no `:`), so `prefix:key` splits one way only.
    }

    #[test]
    fn stable() {
        // Changing this mapping breaks mutual exclusion between versions: never change it.
        assert_eq!(
            lock_name("app", &"z".repeat(100)),
            lock_name("app", &"z".repeat(100))
        );
        assert_eq!(lock_name("app", "Job"), "app:job#84a4fef78ed7ffaf");
    }
}
