//! One config source: every setting is a flag, a `TIERCKPT_*` variable and
//! a TOML key of the same name, and the layers apply in order (file, then
//! environment, then flags), checked on the real `tierckptd` binary.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use clap::{Args, CommandFactory, Parser};
use tierckpt_daemon::ConfigLayer;
use tierckpt_harness::daemon::daemon_binary;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    layer: ConfigLayer,
}

/// `tierckptd` with no `TIERCKPT_*` variable from the caller's environment.
fn tierckptd() -> Command {
    let mut c = Command::new(daemon_binary());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TIERCKPT_")) {
        c.env_remove(k);
    }
    c
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn every_setting_is_a_flag_a_variable_and_a_file_key_of_one_name() {
    let cmd = ConfigLayer::augment_args(clap::Command::new("t"));
    let help = tierckptd().arg("--help").output().expect("tierckptd runs");
    let (help, _) = text(&help);
    let mut flags = BTreeSet::new();
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str().to_string();
        assert_eq!(a.get_long(), Some(id.replace('_', "-").as_str()), "flag of {id}");
        let env = format!("TIERCKPT_{}", id.to_uppercase());
        assert_eq!(a.get_env().and_then(|e| e.to_str()), Some(env.as_str()), "variable of {id}");
        if !a.is_hide_set() {
            assert!(help.contains(&env), "`tierckptd --help` shows {env}");
        }
        flags.insert(id);
    }
    let serde_json::Value::Object(keys) = serde_json::to_value(ConfigLayer::default()).unwrap() else { panic!() };
    let keys: BTreeSet<String> = keys.keys().cloned().collect();
    assert_eq!(flags, keys, "the TOML keys are the flags");
    assert!(keys.len() >= 29, "{} settings", keys.len());
    Flags::command().debug_assert();
}

#[test]
fn file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tierckptd.toml");
    std::fs::write(
        &file,
        "memory_tier_size = \"1GiB\"\nkeep_last = 5\npersist_every = 4\nhttp_addr = \"off\"\n\
         persistent_path = \"file:///tmp/x\"\n[persistent_options]\nallow_http = \"true\"\n",
    )
    .unwrap();
    let out = tierckptd()
        .arg("--config")
        .arg(&file)
        .args(["--print-config", "--memory-tier-size", "2GiB"])
        .env("TIERCKPT_KEEP_LAST", "2")
        .env("TIERCKPT_PERSIST_KEEP_LAST", "7")
        .env("TIERCKPT_PERSIST_KEEP_EVERY", "100")
        .env("TIERCKPT_REPLICATION_DELTA", "no")
        .env("TIERCKPT_TOKEN", "s3cret")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let got: ConfigLayer = toml::from_str(&stdout).unwrap();
    assert_eq!(got.memory_tier_size.as_deref(), Some("2GiB"), "a flag beats the environment and the file");
    assert_eq!(got.keep_last, Some(2), "the environment beats the file");
    assert_eq!(got.persist_every, Some(4), "the file counts where nothing overrides it");
    assert_eq!((got.persist_keep_last, got.persist_keep_every), (Some(7), Some(100)));
    assert_eq!(got.replication_delta, Some(false));
    assert_eq!(got.persistent_options.unwrap().0["allow_http"], "true");
    assert!(!stdout.contains("s3cret") && got.token.as_deref() == Some("<hidden>"), "{stdout}");
}

#[test]
fn bad_settings_are_named_wherever_they_come_from() {
    let out = tierckptd().args(["--print-config"]).env("TIERCKPT_KEEP_LAST", "x").output().unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success() && err.contains("--keep-last") && err.contains("'x'"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "keep_lastt = 3\n").unwrap();
    let out = tierckptd().arg("--config").arg(&file).arg("--print-config").output().unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success() && err.contains("keep_lastt") && err.contains("c.toml"), "{err}");
    std::fs::write(&file, "[[nodes]]\nid = \"a\"\naddress = \"x\"\n").unwrap();
    let out = tierckptd().arg("--config").arg(&file).arg("--print-config").output().unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success() && err.contains("address"), "{err}");
    let out = tierckptd().args(["--print-config", "--persist-every", "0", "--persistent-path", "file:///x"]).output();
    let (_, err) = text(&out.unwrap());
    assert!(err.contains("persist_every must be at least 1"), "{err}");
}
