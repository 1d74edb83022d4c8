//! The agent config's gzip, written as a series of gzip members. RFC 1952 (2.2) makes a gzip
//! file one or more members, and readers (`gunzip`, flate2's `MultiGzDecoder`, which the
//! agents use) return their contents concatenated. The document is cut into chunks at places
//! chosen by its content, and each chunk is its own member: a pod event changes one shared
//! set's text, so it changes one or two chunks, and the members of all the others are reused
//! instead of compressing the whole document again.
//!
//! The bytes depend on the document alone (the cuts and each member's compression are pure),
//! so an unchanged document still gives a byte-identical ConfigMap, whatever the cache held.

use std::collections::HashMap;
use std::ops::Range;

use flate2::Compress;
use memchr::memmem;

use stratum_api::agent_config::gzip_member;

use super::agent_config::fingerprint;

/// A chunk is cut only once it holds this much: each member restarts compression without
/// history and costs a header, so small chunks compress worse. At 1000 tenants and 10,000
/// pods, 8 KiB gives 46 KiB gzipped and 16 KiB 43 KiB, for 8% more work per pod event.
const MIN_CHUNK: usize = 8 * 1024;
/// A chunk past this is cut at the next element boundary, whatever its content.
const MAX_CHUNK: usize = 32 * 1024;
/// Past `MIN_CHUNK`, about one element boundary in this many is a cut.
const SPREAD: u64 = 8;
/// How many bytes after a boundary decide whether it is a cut.
const WINDOW: usize = 16;

/// The members of the last gzip, by the fingerprint of their text, and a deflate state to
/// compress new ones with: setting one up (zeroing its tables) costs more than compressing a
/// small chunk, so it is reset between members instead.
#[derive(Debug, Default)]
pub struct MemberCache {
    members: HashMap<u64, Member>,
    deflate: Option<Compress>,
}

#[derive(Debug)]
struct Member {
    text: Box<[u8]>,
    gzip: Box<[u8]>,
}

/// Where `text` is cut into members. Cuts fall only between elements of a JSON list (after
/// the comma of `},{` or `],[`: between tenants, between shared sets), and whether a
/// boundary is a cut depends on the bytes after it and on the chunk's length so far, never
/// on anything further back: a change moves the cuts of its own chunk and perhaps the next,
/// and the rest fall where they did. The first chunk ends at the first boundary, because it
/// holds the revision, which changes every time.
pub fn chunks(text: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for at in boundaries(text) {
        let length = at - start;
        let cut = if out.is_empty() {
            true
        } else if length < MIN_CHUNK {
            false
        } else {
            let window = &text[at..(at + WINDOW).min(text.len())];
            length >= MAX_CHUNK || fingerprint(window).is_multiple_of(SPREAD)
        };
        if cut {
            out.push(start..at);
            start = at;
        }
    }
    if start < text.len() || out.is_empty() {
        out.push(start..text.len());
    }
    out
}

/// Offsets just after the comma of every `},{` and `],[` in `text`, in order.
fn boundaries(text: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut objects = memmem::find_iter(text, b"},{").peekable();
    let mut lists = memmem::find_iter(text, b"],[").peekable();
    std::iter::from_fn(move || {
        let next = match (objects.peek(), lists.peek()) {
            (Some(o), Some(l)) if o < l => objects.next(),
            (Some(_), None) => objects.next(),
            _ => lists.next(),
        };
        next.map(|at| at + 2)
    })
}

/// `text` gzipped as one member per chunk, compressing only chunks not in `cache`. The cache
/// is left holding this text's members.
pub fn gzip_members(text: &[u8], cache: &mut MemberCache) -> Vec<u8> {
    let ranges = chunks(text);
    let mut out = Vec::with_capacity(text.len() / 5);
    let mut used = HashMap::with_capacity(ranges.len());
    for range in ranges {
        let chunk = &text[range];
        let key = fingerprint(chunk);
        let member = match cache.members.remove(&key) {
            // Equal fingerprints of different texts are possible: compare before reusing.
            Some(hit) if *hit.text == *chunk => hit,
            _ => Member {
                text: chunk.into(),
                gzip: gzip_member(chunk, &mut cache.deflate).into(),
            },
        };
        out.extend_from_slice(&member.gzip);
        used.insert(key, member);
    }
    cache.members = used;
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Read;

    use super::*;

    /// A document shaped like an agent config: a head, then many list elements.
    fn document(sets: usize, changed: Option<usize>) -> String {
        let mut text = String::from(r#"{"version":2,"revision":"0123","serving":{"tenants":["#);
        for i in 0..sets {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&format!(r#"{{"id":"ns-{i}/t","port":{}}}"#, 12000 + i));
        }
        text.push_str(r#"],"cidrSets":["#);
        for i in 0..sets {
            if i > 0 {
                text.push(',');
            }
            let extra = if changed == Some(i) {
                ",\"10.99.0.1/32\""
            } else {
                ""
            };
            text.push_str(&format!(
                r#"["10.{}.{}.0/24","fd00:{i:x}::/64"{extra}]"#,
                i / 256,
                i % 256
            ));
        }
        text.push_str("]}}");
        text
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn chunks_cover_the_text_in_order_and_cut_only_between_elements() {
        let text = document(3000, None);
        let ranges = chunks(text.as_bytes());
        assert!(ranges.len() > 5, "{} chunks", ranges.len());
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges.last().unwrap().end, text.len());
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        for r in &ranges[1..] {
            let before = &text.as_bytes()[r.start - 2..r.start + 1];
            assert!(before == b"},{" || before == b"],[", "{before:?}");
            assert!(r.len() <= MAX_CHUNK + 200, "{} bytes", r.len());
        }
        for r in &ranges[1..ranges.len() - 1] {
            assert!(r.len() >= MIN_CHUNK, "{} bytes", r.len());
        }
        assert!(
            ranges[0].len() < 200,
            "the revision's chunk ends at the first boundary"
        );
    }

    #[test]
    fn members_decode_to_the_text_and_the_bytes_do_not_depend_on_the_cache() {
        let before = document(3000, None);
        let after = document(3000, Some(2500));
        let mut warm = MemberCache::default();
        let first = gzip_members(before.as_bytes(), &mut warm);
        assert_eq!(gunzip(&first), before.as_bytes());
        let incremental = gzip_members(after.as_bytes(), &mut warm);
        let fresh = gzip_members(after.as_bytes(), &mut MemberCache::default());
        assert_eq!(incremental, fresh);
        assert_eq!(gunzip(&incremental), after.as_bytes());
    }

    #[test]
    fn a_change_in_one_element_leaves_the_members_of_far_chunks_as_they_were() {
        let before = document(3000, None);
        let after = document(3000, Some(2500));
        let old: Vec<&[u8]> = chunks(before.as_bytes())
            .into_iter()
            .map(|r| &before.as_bytes()[r])
            .collect();
        let new: Vec<&[u8]> = chunks(after.as_bytes())
            .into_iter()
            .map(|r| &after.as_bytes()[r])
            .collect();
        let changed = new.iter().filter(|c| !old.contains(c)).count();
        assert!(new.len() > 10);
        assert!(changed <= 2, "{changed} of {} chunks changed", new.len());
    }

    #[test]
    fn a_short_or_boundaryless_text_is_one_or_two_members() {
        let mut cache = MemberCache::default();
        for text in ["", "{}", r#"{"a":[{"b":1},{"c":2}]}"#] {
            let gz = gzip_members(text.as_bytes(), &mut cache);
            assert_eq!(gunzip(&gz), text.as_bytes());
            assert!(chunks(text.as_bytes()).len() <= 2);
        }
    }
}
