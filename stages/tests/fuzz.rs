//! Fuzzing of the two readers of untrusted input: the NIfTI reader and the pipeline-file
//! loader. Each runs for a bounded time (`MEDUET_FUZZ_SECONDS`, default 60 s each) over
//! mutations of a corpus kept in the repository (`tests/fuzz_corpus/`: NIfTI seeds written
//! by nibabel, see `make_nifti_corpus.py`; the shipped pipelines and a few pipeline seeds),
//! structure-aware where it pays (header fields set to boundary values, TOML values
//! replaced by hostile ones) and byte-level otherwise. Errors are the expected outcome; a
//! panic is a bug, and proptest shrinks it to a minimal input. Each prints how many inputs
//! it tried.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn budget() -> Duration {
    let s = std::env::var("MEDUET_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(60.0);
    Duration::from_secs_f64(s)
}

fn corpus(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        // Files only: `pipelines/` holds a `.meduet` cache once a shipped pipeline has run.
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus '{}'", dir.display());
    v
}

/// One edit of an input.
#[derive(Debug, Clone)]
enum Edit {
    /// Overwrites 2 or 4 bytes at a header field offset with a boundary value.
    Field {
        at: usize,
        value: [u8; 4],
        width: usize,
    },
    /// Sets one byte.
    Byte { at: usize, byte: u8 },
    /// Removes bytes.
    Delete { at: usize, len: usize },
    /// Inserts bytes (or a hostile token, for text).
    Insert { at: usize, bytes: Vec<u8> },
    /// Cuts the input.
    Truncate { at: usize },
    /// Replaces the value after the `=` of a line (text).
    Value { line: usize, token: usize },
    /// Repeats or drops a line (text).
    Line { line: usize, repeat: bool },
}

/// Offsets of the NIfTI-1 header fields a reader trusts: sizeof_hdr, dim[0..8], datatype,
/// bitpix, pixdim[0..8], vox_offset, scl_slope, scl_inter, qform/sform codes, quatern
/// b/c/d and offsets, srow_x/y/z.
const NIFTI_FIELDS: &[usize] = &[
    0, 40, 42, 44, 46, 48, 50, 70, 72, 76, 80, 84, 88, 92, 108, 112, 116, 252, 254, 256, 260, 264,
    268, 272, 276, 280, 284, 288, 292, 296, 300, 304, 308, 312, 316, 320, 324, 344,
];

fn boundary_values() -> Vec<[u8; 4]> {
    let ints: [i32; 10] = [0, 1, -1, 2, 3, 8, 7, 32767, -32768, i32::MAX];
    let floats: [f32; 9] = [
        0.0,
        -0.0,
        1e30,
        -1e30,
        1e-30,
        f32::NAN,
        f32::INFINITY,
        351.0,
        1e6,
    ];
    ints.iter()
        .map(|i| i.to_le_bytes())
        .chain(
            ints.iter()
                .map(|i| (*i as i16).to_le_bytes())
                .map(|b| [b[0], b[1], 0, 0]),
        )
        .chain(floats.iter().map(|f| f.to_le_bytes()))
        .chain(floats.iter().map(|f| f.to_be_bytes()))
        .collect()
}

/// Hostile TOML values.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "\"\"",
    "[]",
    "{}",
    "true",
    "\"..\"",
    "\"a.b\"",
    "18446744073709551616",
    "-9223372036854775809",
    "\"/abs/path\"",
    "\"~/x\"",
    "[[1]]",
    "{ kind = \"sgd\" }",
    "\"stage.output\"",
    "\"a.text\"",
    "[\"a.text\", \"a.text\"]",
    "0.0",
    "1e-320",
    "\"\\u0000\"",
    "'''\n'''",
    "{ = }",
    "9999999999",
];

fn edit_strategy(text: bool) -> impl Strategy<Value = Edit> {
    let values = boundary_values();
    let field = (
        proptest::sample::select(NIFTI_FIELDS.to_vec()),
        proptest::sample::select(values),
        prop_oneof![Just(2usize), Just(4usize)],
    )
        .prop_map(|(at, value, width)| Edit::Field { at, value, width });
    let byte = (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Byte { at, byte });
    let delete = (any::<usize>(), 1usize..64).prop_map(|(at, len)| Edit::Delete { at, len });
    let insert = (
        any::<usize>(),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..16),
            proptest::sample::select(TOKENS.to_vec()).prop_map(|t| t.as_bytes().to_vec()),
        ],
    )
        .prop_map(|(at, bytes)| Edit::Insert { at, bytes });
    let truncate = any::<usize>().prop_map(|at| Edit::Truncate { at });
    let value =
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(line, token)| Edit::Value { line, token });
    let line =
        (any::<usize>(), any::<bool>()).prop_map(|(line, repeat)| Edit::Line { line, repeat });
    if text {
        prop_oneof![4 => value, 2 => line, 2 => insert, 1 => delete, 1 => byte, 1 => truncate]
            .boxed()
    } else {
        prop_oneof![5 => field, 3 => byte, 1 => delete, 1 => insert, 1 => truncate].boxed()
    }
}

fn apply(input: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = input.to_vec();
    for e in edits {
        let n = b.len().max(1);
        match e {
            Edit::Field { at, value, width } => {
                if at + width <= b.len() {
                    b[*at..at + width].copy_from_slice(&value[..*width]);
                }
            }
            Edit::Byte { at, byte } => {
                if !b.is_empty() {
                    b[at % n] = *byte;
                }
            }
            Edit::Delete { at, len } => {
                let s = at % n;
                let end = (s + len).min(b.len());
                if s < end {
                    b.drain(s..end);
                }
            }
            Edit::Insert { at, bytes } => {
                let s = at % (b.len() + 1);
                b.splice(s..s, bytes.iter().copied());
            }
            Edit::Truncate { at } => b.truncate(at % n),
            Edit::Value { line, token } => {
                b = edit_line(&b, *line, |l| match l.find('=') {
                    Some(i) => format!("{} {}", &l[..=i], TOKENS[*token]),
                    None => l.to_string(),
                })
            }
            Edit::Line { line, repeat } => {
                b = edit_line(&b, *line, |l| {
                    if *repeat {
                        format!("{l}\n{l}")
                    } else {
                        String::new()
                    }
                })
            }
        }
    }
    b
}

fn edit_line(b: &[u8], line: usize, f: impl Fn(&str) -> String) -> Vec<u8> {
    let text = String::from_utf8_lossy(b);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return b.to_vec();
    }
    let i = line % lines.len();
    lines[i] = f(&lines[i]);
    lines.join("\n").into_bytes()
}

/// Runs `check` on mutated corpus inputs until the budget is spent, in chunks of seeded
/// proptest runs (so a failure names a reproducible, shrunk input). Returns the number of
/// inputs tried.
fn fuzz(
    name: &str,
    seeds: &[(String, Vec<u8>)],
    text: bool,
    check: impl Fn(&str, &[u8]) -> Result<(), TestCaseError>,
) -> u64 {
    let deadline = Instant::now() + budget();
    let tried = std::cell::Cell::new(0u64);
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec(edit_strategy(text), 0..6),
    );
    let mut chunk = 0u64;
    while Instant::now() < deadline {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&chunk.to_le_bytes());
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: 256,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
        );
        let result = runner.run(&strategy, |(i, edits)| {
            tried.set(tried.get() + 1);
            let (seed_name, input) = &seeds[i];
            check(seed_name, &apply(input, &edits))
        });
        if let Err(e) = result {
            panic!("{name} fuzzing (chunk {chunk}) found a failure: {e}");
        }
        chunk += 1;
    }
    let n = tried.get();
    println!(
        "{name}: {n} inputs in {:.0} s from {} seeds, no panic",
        budget().as_secs_f64(),
        seeds.len()
    );
    n
}

fn corpus_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(sub)
}

#[test]
fn nifti_reader_never_panics() {
    let seeds = corpus(&corpus_dir("nifti"));
    // Every seed reads (the corpus is valid input).
    for (name, bytes) in &seeds {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        meduet_stages::data::nifti_io::read_nifti(&p)
            .unwrap_or_else(|e| panic!("seed {name} does not read: {e}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let n = fuzz("NIfTI reader", &seeds, false, |name, bytes| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        // Any result but a panic; an error names the file.
        if let Err(e) = meduet_stages::data::nifti_io::read_nifti(&p) {
            prop_assert!(
                e.to_string().contains(name),
                "error without the file name: {e}"
            );
        }
        let _ = meduet_stages::data::nifti_io::read_nifti_labels(&p);
        Ok(())
    });
    assert!(n > 0);
}

#[test]
fn pipeline_loader_never_panics() {
    let mut seeds = corpus(&corpus_dir("pipeline"));
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    seeds.extend(corpus(&shipped));
    // The seeds and the files they include sit side by side; the mutant is loaded there.
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in &seeds {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let registry = meduet_stages::registry();
    for (name, _) in &seeds {
        meduet_engine::Pipeline::load(&dir.path().join(name), &registry)
            .unwrap_or_else(|e| panic!("seed {name} does not load: {e}"));
    }
    let mutant = dir.path().join("mutant.toml");
    let n = fuzz("pipeline loader", &seeds, true, |_, bytes| {
        std::fs::write(&mutant, bytes).unwrap();
        let _ = meduet_engine::Pipeline::load(&mutant, &registry);
        Ok(())
    });
    assert!(n > 0);
}
