//! Bad job files: each is refused with file, line, column, field and a hint, and nothing is
//! stored.

use crate::harness::Cluster;

/// (file name, content, expected pieces of the message)
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "no-version.yaml",
        "name: x\ntasks:\n  - name: a\n    command: \"true\"\n",
        &["no-version.yaml:1:1", "version"],
    ),
    (
        "version-2.yaml",
        "version: 2\nname: x\ntasks:\n  - name: a\n    command: \"true\"\n",
        &["version-2.yaml:1:10", "version"],
    ),
    (
        "unknown-field.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    comand: \"true\"\n",
        &["unknown-field.yaml:5:5", "comand", "did you mean `command`"],
    ),
    (
        "wrong-type.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    command: \"true\"\n    depends_on: 5\n",
        &["wrong-type.yaml:6:17", "tasks[0].depends_on"],
    ),
    (
        "duplicate.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    command: \"true\"\n  - name: a\n    command: \"true\"\n",
        &["duplicate.yaml:6:", "tasks[1].name", "`a`"],
    ),
    (
        "unknown-dep.yaml",
        "version: 1\nname: x\ntasks:\n  - name: build\n    command: \"true\"\n  - name: b\n    depends_on: [biuld]\n    command: \"true\"\n",
        &["unknown-dep.yaml:7:", "biuld", "build"],
    ),
    (
        "cycle.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    depends_on: [b]\n    command: \"true\"\n  - name: b\n    depends_on: [a]\n    command: \"true\"\n",
        &["cycle.yaml:", "cycle", "a -> b -> a"],
    ),
    (
        "bad-frames.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    array: \"5-1\"\n    command: \"true\"\n",
        &["bad-frames.yaml:5:12", "tasks[0].array"],
    ),
    (
        "bad-timeout.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    timeout: soon\n    command: \"true\"\n",
        &["bad-timeout.yaml:5:14", "tasks[0].timeout"],
    ),
    (
        "bad-memory.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    resources: { memory: lots }\n    command: \"true\"\n",
        &["bad-memory.yaml:5:", "memory", "lots"],
    ),
    (
        "huge-memory.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    resources: { memory: 2000TiB }\n    command: \"true\"\n",
        &["huge-memory.yaml", "tasks[0].resources.memory", "more than the limit of 1024TiB"],
    ),
    (
        "undefined-param.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    command: \"echo {{ params.nope }}\"\n",
        &["undefined-param.yaml:5:14", "params.nope"],
    ),
    (
        "frame-outside-array.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    command: \"echo {{ frame }}\"\n",
        &["frame-outside-array.yaml:5:", "frame", "array"],
    ),
    (
        "both-command-and-steps.yaml",
        "version: 1\nname: x\ntasks:\n  - name: a\n    command: \"true\"\n    steps: [\"true\"]\n",
        &["both-command-and-steps.yaml:", "steps", "command"],
    ),
    ("no-command.yaml", "version: 1\nname: x\ntasks:\n  - name: a\n", &["no-command.yaml:4:", "command"]),
    ("syntax.yaml", "version: 1\nname: [unclosed\ntasks: []\n", &["syntax.yaml:"]),
    ("bad.json", "{\"version\": 1, \"name\": \"x\", \"tasks\": [}\n", &["bad.json:1:"]),
];

#[test]
fn bad_job_files_are_refused_with_their_position_and_nothing_is_stored() {
    let c = Cluster::start(0, 1);
    for (name, text, expected) in CASES {
        let path = c.job_file(name, text);
        let path = path.display().to_string();
        for command in ["validate", "submit"] {
            let out = c.drover(&[command, &path]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {name} should fail with 2: {stderr}");
            for piece in *expected {
                assert!(stderr.contains(piece), "{command} {name}: expected `{piece}` in:\n{stderr}");
            }
            assert!(stderr.contains("nothing was submitted"), "{stderr}");
        }
    }
    let ps = c.ok(&["ps", "--all", "-o", "json"]);
    assert_eq!(ps.trim(), "[]", "no bad file may store a job");
}

#[test]
fn examples_validate() {
    let c = Cluster::start(0, 1);
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let out = c.drover(&["validate", &path.display().to_string()]);
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        seen += 1;
    }
    assert!(seen >= 3);
}

#[test]
fn unreachable_server_says_how_to_start_one() {
    let out = std::process::Command::new(crate::harness::drover_bin())
        .args(["ps", "--server", "127.0.0.1:1"])
        .env("DROVER_CREDENTIALS", "/nonexistent/credentials")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the drover server at http://127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("drover up"), "{stderr}");
}
