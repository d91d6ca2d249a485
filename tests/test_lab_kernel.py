"""Tests of the lab's kernel half: config merge/verify, cache keying and atomic artifacts, the
private apt setup, bzImage validation, selftest descriptions; plus a lab-tier real build check."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from luoagent.errors import LabBuildError
from luoagent.lab import cache, debian, kernel, selftests
from luoagent.lab.cache import Artifact, inputs_hash
from luoagent.report import Progress


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_cache_override", None)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- config fragments ---------------------------------------------------------------------------
def test_parse_config_reads_set_and_not_set_lines_and_ignores_comments():
    text = "# a comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S=\"x y\"\n\nCONFIG_A=m\n"
    assert kernel.parse_config(text) == {"CONFIG_A": "m", "CONFIG_B": "n", "CONFIG_S": '"x y"'}


def test_parse_fragment_rejects_malformed_line_with_its_location(tmp_path):
    frag = tmp_path / "bad.config"
    frag.write_text("# fine\nCONFIG_A=y\nKEXEC_FILE=y\n")
    with pytest.raises(LabBuildError, match=r"bad.config:3: .*KEXEC_FILE=y"):
        kernel.parse_fragment(frag)


def test_merge_replaces_in_place_appends_new_and_later_fragment_wins():
    base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n"
    merged = kernel.merge_config(base, [{"CONFIG_B": "y", "CONFIG_D": "y"}, {"CONFIG_C": "n", "CONFIG_D": "m"}])
    assert merged.splitlines() == ["CONFIG_A=y", "CONFIG_B=y", "# CONFIG_C is not set", "CONFIG_D=m"]


def test_missing_options_treats_absent_as_not_set():
    final = {"CONFIG_A": "y", "CONFIG_B": "m"}
    requested = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "y", "CONFIG_D": "n"}
    assert kernel.missing_options(final, requested) == [("CONFIG_B", "y", "m"), ("CONFIG_C", "y", "n")]


def test_verify_config_names_every_dropped_option(tmp_path):
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_LIVEUPDATE=y\nCONFIG_LIVEUPDATE_MEMFD=y\nCONFIG_TMPFS=y\n")
    final = "CONFIG_TMPFS=y\n# CONFIG_LIVEUPDATE is not set\n"
    with pytest.raises(LabBuildError) as err:
        kernel.verify_config(final, [frag])
    msg = str(err.value)
    assert "CONFIG_LIVEUPDATE=y (from f.config) ended up not set" in msg
    assert "CONFIG_LIVEUPDATE_MEMFD=y" in msg
    assert "CONFIG_TMPFS" not in msg


def test_verify_config_accepts_a_config_that_honours_the_fragment(tmp_path):
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y\n# CONFIG_B is not set\n")
    kernel.verify_config("CONFIG_A=y\n", [frag])  # B absent == not set


def test_verify_config_hint_shows_kconfig_dependencies(tmp_path):
    src = tmp_path / "src"
    (src / "kernel").mkdir(parents=True)
    (src / "kernel" / "Kconfig").write_text(
        "config FOO\n\tbool \"foo\"\n\tdepends on BAR && BAZ\n\thelp\n\t  x\n\nconfig OTHER\n\tbool\n")
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_FOO=y\n")
    with pytest.raises(LabBuildError, match=r"CONFIG_FOO=y .*depends on BAR && BAZ"):
        kernel.verify_config("", [frag], src)


def test_repo_fragments_parse_and_hold_the_luo_options():
    luo, lab = kernel.default_fragments()
    luo_opts = kernel.parse_fragment(luo)
    for name in ("KEXEC_FILE", "KEXEC_HANDOVER", "LIVEUPDATE", "LIVEUPDATE_MEMFD", "MEMFD_CREATE", "SHMEM"):
        assert luo_opts[f"CONFIG_{name}"] == "y"
    lab_opts = kernel.parse_fragment(lab)
    for name in ("VIRTIO_BLK", "SERIAL_8250_CONSOLE", "EXT4_FS", "DEVTMPFS", "TMPFS", "PROC_FS",
                 "HUGETLBFS", "DEBUG_FS", "KEXEC_HANDOVER_DEBUGFS", "IKCONFIG_PROC", "64BIT"):
        assert lab_opts[f"CONFIG_{name}"] == "y", name
    assert "CONFIG_RELOCATABLE" in {**luo_opts, **lab_opts}


@pytest.mark.parametrize("name", ["luo.config", "lab.config"])
def test_every_fragment_option_has_a_comment_saying_why(name):
    lines = (kernel.configs_dir() / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("CONFIG_"):
            # the option is preceded by a comment, possibly through a run of related options
            j = i - 1
            while j >= 0 and lines[j].startswith("CONFIG_"):
                j -= 1
            assert j >= 0 and lines[j].startswith("# ") and len(lines[j]) > 10, f"{name}: {line} has no why-comment"


# --- cache keying -----------------------------------------------------------------------------
def test_inputs_hash_is_stable_ordered_and_typed(tmp_path):
    f = tmp_path / "a"
    f.write_text("x")
    assert inputs_hash("a", "b") == inputs_hash("a", "b")
    assert inputs_hash("a", "b") != inputs_hash("b", "a")
    assert inputs_hash("ab") != inputs_hash("a", "b")
    assert inputs_hash(str(f)) != inputs_hash(f)  # a str is a literal, a Path its content
    assert inputs_hash(None) != inputs_hash("None")
    assert len(inputs_hash("x")) == 16 and re.fullmatch(r"[0-9a-f]+", inputs_hash("x"))


def test_inputs_hash_follows_file_content_not_mtime_or_location(tmp_path):
    a, b = tmp_path / "one" / "f.config", tmp_path / "two" / "f.config"
    a.parent.mkdir(), b.parent.mkdir()
    a.write_text("CONFIG_A=y\n")
    b.write_text("CONFIG_A=y\n")
    h = inputs_hash(a)
    assert inputs_hash(b) == h
    os.utime(a, (1, 1))
    assert inputs_hash(a) == h
    a.write_text("CONFIG_A=n\n")
    assert inputs_hash(a) != h


def test_inputs_hash_of_a_tree_sees_content_names_and_exec_bit(tmp_path):
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x").write_text("1")
    (tree / "y").write_text("2")
    h = inputs_hash(tree)
    (tree / "y").write_text("3")
    h2 = inputs_hash(tree)
    assert h2 != h
    (tree / "y").rename(tree / "z")
    assert inputs_hash(tree) != h2
    (tree / "z").chmod(0o755)
    assert inputs_hash(tree) not in (h, h2)


def test_inputs_hash_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(LabBuildError, match="does not exist"):
        inputs_hash(tmp_path / "nope")


def test_kernel_key_changes_with_fragment_and_source(tmp_path):
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y\n")
    src = kernel.KernelSource(tmp_path, "debian:linux-source-7.2=7.2.13-1", "k", local=False)
    other = kernel.KernelSource(tmp_path, "debian:linux-source-7.2=7.2.14-1", "k", local=False)
    k1 = kernel.kernel_key(src, [frag])
    assert kernel.kernel_key(src, [frag]) == k1
    assert kernel.kernel_key(other, [frag]) != k1
    frag.write_text("# why A\nCONFIG_A=y\n")
    assert kernel.kernel_key(src, [frag]) == k1  # comments do not change the build
    frag.write_text("CONFIG_A=y\nCONFIG_B=y\n")
    assert kernel.kernel_key(src, [frag]) != k1
    frag.write_text("CONFIG_A=y\n# CONFIG_B is not set\n")
    assert kernel.kernel_key(src, [frag]) != k1


# --- cache dir and atomic artifacts ---------------------------------------------------------------
def test_cache_dir_default_env_and_override(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_cache_override", None)
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "luoagent"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.cache_dir() == tmp_path / "env"
    cache.set_cache_dir(tmp_path / "cli")
    try:
        assert cache.cache_dir() == tmp_path / "cli"
        assert os.environ[cache.CACHE_ENV] == str(tmp_path / "cli")  # children inherit it
    finally:
        cache.set_cache_dir(None)


def test_cache_dir_unwritable_is_actionable(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(cache, "_cache_override", None)
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "sub"))
    with pytest.raises(LabBuildError, match="LUOAGENT_CACHE"):
        cache.cache_dir()


def test_artifact_appears_only_after_a_successful_build(tmp_cache):
    art = Artifact("thing", "k1")
    assert not art.exists()
    with art.build() as tmp:
        (tmp / "out").write_text("done")
        assert not art.exists()  # not visible while building
    assert art.exists() and (art / "out").read_text() == "done"
    assert [p.name for p in art.kind_dir.iterdir() if p.name.startswith(".tmp")] == []


def test_interrupted_build_leaves_no_half_artifact(tmp_cache):
    art = Artifact("thing", "k2")
    with pytest.raises(KeyboardInterrupt):
        with art.build() as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert not art.exists()
    assert [p.name for p in art.kind_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_stale_temp_of_a_dead_builder_is_removed(tmp_cache):
    kind_dir = tmp_cache / "thing"
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = kind_dir / f".tmp-k3-{proc.pid}"
    stale.mkdir(parents=True)
    with Artifact("thing", "k3").build() as tmp:
        (tmp / "f").write_text("")
    assert not stale.exists()


def test_artifact_replace_swaps_whole_directory(tmp_cache):
    art = Artifact("thing", "k4")
    with art.build() as tmp:
        (tmp / "old").write_text("")
    with art.build() as tmp:  # without replace the existing artifact stays
        (tmp / "new").write_text("")
    assert (art / "old").exists() and not (art / "new").exists()
    with art.build(replace=True) as tmp:
        (tmp / "new").write_text("")
    assert (art / "new").exists() and not (art / "old").exists()


def test_require_space_names_the_shortfall(tmp_path):
    with pytest.raises(LabBuildError, match=r"not enough disk space for the moon: .* GB free"):
        cache.require_space(tmp_path, 10**18, "the moon")


# --- progress ------------------------------------------------------------------------------------
def test_progress_non_tty_prints_phase_percentage_and_done():
    out = io.StringIO()
    p = Progress("lab kernel", stream=out, tty=False, interval=0)
    p.phase("compile", total=200)
    p.update(done=50, note="50 objects")
    p.phase("install")
    p.done("finished")
    text = out.getvalue()
    assert "[lab kernel] compile  0s" in text
    assert " 25%  50 objects" in text
    assert "compile" in text and "done" in text
    assert text.rstrip().splitlines()[-1].startswith("[lab kernel] finished (")
    assert [name for name, _s in p.timings] == ["compile", "install"]


def test_progress_tty_rewrites_one_line():
    out = io.StringIO()
    p = Progress("x", stream=out, tty=True)
    p.phase("step", total=4)
    p.update(done=1)
    p.done()
    assert "\r\033[K[x] step" in out.getvalue()


def test_progress_quiet_prints_nothing_but_times():
    out = io.StringIO()
    p = Progress("x", stream=out, tty=False, quiet=True)
    p.phase("a")
    p.done("bye")
    assert out.getvalue() == "" and p.timings[0][0] == "a"


# --- Debian mirror and private apt ---------------------------------------------------------------
def test_mirror_from_deb822_skips_security_stanza(tmp_path, monkeypatch):
    monkeypatch.delenv(debian.MIRROR_ENV, raising=False)
    src = tmp_path / "debian.sources"
    src.write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n")
    assert debian.mirror(src, tmp_path / "none") == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_with_options(tmp_path, monkeypatch):
    monkeypatch.delenv(debian.MIRROR_ENV, raising=False)
    lst = tmp_path / "sources.list"
    lst.write_text("# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n")
    assert debian.mirror(tmp_path / "none", lst) == "http://m.example/debian"


def test_mirror_missing_everywhere_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv(debian.MIRROR_ENV, raising=False)
    with pytest.raises(LabBuildError, match="LUOAGENT_DEBIAN_MIRROR"):
        debian.mirror(tmp_path / "a", tmp_path / "b")


def test_mirror_env_override(monkeypatch):
    monkeypatch.setenv(debian.MIRROR_ENV, "http://x.example/debian/")
    assert debian.mirror() == "http://x.example/debian"


def test_private_apt_writes_only_under_the_cache(tmp_cache):
    ctx = debian.private_apt(mirror_uri="http://m.example/debian")
    assert ctx.root == tmp_cache / "apt"
    assert ctx.sources_list.read_text() == (
        "deb http://m.example/debian sid main\ndeb http://m.example/debian trixie main\n"
        "deb http://m.example/debian trixie-backports main\n")
    opts = dict(o.split("=", 1) for o in ctx.options()[1::2])
    assert opts["Dir::Etc::SourceParts"] == "/dev/null"
    for key in ("Dir::Etc::SourceList", "Dir::State::Lists", "Dir::Cache"):
        assert opts[key].startswith(str(tmp_cache)), key
    other = debian.private_apt(("trixie",), mirror_uri="http://m.example/debian")
    assert other.root != ctx.root


def test_private_apt_drops_lists_when_sources_change(tmp_cache):
    ctx = debian.private_apt(mirror_uri="http://a.example/debian")
    stale = ctx.lists_dir / "a.example_debian_dists_sid_main_binary-amd64_Packages"
    stale.write_text("")
    assert ctx.has_lists()
    debian.private_apt(mirror_uri="http://b.example/debian")
    assert not stale.exists()



def test_print_uris_remembers_answers_until_the_lists_change(tmp_cache, monkeypatch):
    ctx = debian.private_apt(mirror_uri="http://m.example/debian")
    lists = ctx.lists_dir / "m.example_debian_dists_sid_main_binary-amd64_Packages"
    lists.write_text("v1")
    calls = []

    def fake_run(tool, *args, cwd=None, check=True):
        calls.append(args)
        out = f"'http://m.example/p/x_{len(calls)}_all.deb' x_{len(calls)}_all.deb 42 SHA256:00\n"
        return subprocess.CompletedProcess([tool, *args], 0, out, "")

    monkeypatch.setattr(ctx, "run", fake_run)
    want = [("http://m.example/p/x_1_all.deb", "x_1_all.deb", 42)]
    assert ctx.print_uris(["x"]) == want
    assert ctx.print_uris(["x"]) == want and len(calls) == 1
    lists.write_text("v2, after an apt-get update")
    assert ctx.print_uris(["x"])[0][1] == "x_2_all.deb"
    assert len(calls) == 2

# --- bzImage and selftests -------------------------------------------------------------------------
def test_validate_bzimage(tmp_path):
    good = tmp_path / "bzImage"
    good.write_bytes(b"\0" * 0x1FE + b"\x55\xaa\0\0HdrS" + b"\0" * 100)  # boot flag + magic
    assert kernel.validate_bzimage(good) == good
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF" + b"\0" * 1000)
    with pytest.raises(LabBuildError, match="not an x86 bzImage"):
        kernel.validate_bzimage(bad)
    with pytest.raises(LabBuildError, match="cannot read kernel image"):
        kernel.validate_bzimage(tmp_path / "missing")


def test_local_source_rejects_non_tree_and_dirty_tree(tmp_path):
    with pytest.raises(LabBuildError, match="not a Linux source tree"):
        kernel.local_source(tmp_path)
    for f in ("Makefile", "Kconfig"):
        (tmp_path / f).write_text("")
    (tmp_path / "arch/x86").mkdir(parents=True)
    src = kernel.local_source(tmp_path)
    assert src.local and src.key.startswith("local-")
    (tmp_path / ".config").write_text("")
    with pytest.raises(LabBuildError, match="mrproper"):
        kernel.local_source(tmp_path)


def test_selftest_programs_from_makefile_and_specs(tmp_path):
    mk = tmp_path / "Makefile"
    mk.write_text("TEST_GEN_PROGS += liveupdate\nTEST_GEN_PROGS_EXTENDED += luo_kexec_simple\n"
                  "TEST_GEN_PROGS_EXTENDED += luo_new_thing\n")
    plain, extended = selftests.makefile_programs(mk)
    assert plain == ["liveupdate"] and extended == ["luo_kexec_simple", "luo_new_thing"]
    specs = {s["name"]: s for s in selftests.specs_for(plain, extended)}
    assert specs["liveupdate"]["stages"] == [[]] and not specs["liveupdate"]["kexec"]
    assert specs["luo_kexec_simple"]["stages"] == [["-s", "1"], ["-s", "2"]]  # 7.3 takes only -s
    assert specs["luo_new_thing"]["kexec"]


def test_is_static_elf(tmp_path):
    assert not selftests.is_static_elf(Path(shutil.which("ls")))  # dynamically linked
    (tmp_path / "t.c").write_text("int main(void){return 0;}\n")
    subprocess.run(["gcc", "-static", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    assert selftests.is_static_elf(tmp_path / "t")
    (tmp_path / "txt").write_text("hello")
    assert not selftests.is_static_elf(tmp_path / "txt")


# --- the real thing (lab tier): uses the lab cache; builds on a cold cache (~7 min) ---------------
@pytest.mark.lab
@pytest.mark.slow
def test_lab_kernel_builds_with_every_requested_option_and_static_selftests():
    info = kernel.build_kernel_info("7.2")
    kernel.validate_bzimage(info.bzimage)
    final = kernel.parse_config(info.config.read_text())
    for frag in kernel.default_fragments():
        assert kernel.missing_options(final, kernel.parse_fragment(frag)) == [], frag.name
    assert info.release.startswith("7.2")
    st = selftests.build_selftests(info)
    specs = selftests.load_specs(st)
    names = {s["name"] for s in specs}
    assert {"liveupdate", "luo_kexec_simple", "luo_multi_session"} <= names
    for s in specs:
        assert selftests.is_static_elf(st / s["name"]), s["name"]


def test_artifact_lock_reports_waiting_when_held_elsewhere(tmp_cache):
    import threading

    art = Artifact("thing", "k5")
    waited = []
    held, release = threading.Event(), threading.Event()

    def holder():
        with art.lock():
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    threading.Timer(0.2, release.set).start()
    with art.lock(on_wait=lambda: waited.append(True)):
        pass
    t.join()
    assert waited == [True]
    with art.lock(on_wait=lambda: waited.append(False)):
        pass  # uncontended: no wait reported
    assert waited == [True]


@pytest.mark.parametrize("version, expected", [("7.2", ("7.2", None)), ("7.3", ("7.3", None)),
                                               ("7.2.12", ("7.2", "7.2.12"))])
def test_kernel_version_is_a_series_or_an_exact_release_of_one(version, expected):
    assert kernel.split_version(version) == expected


@pytest.mark.parametrize("bad", ["7.4", "7.4.1", "7", "7.2.x", "latest"])
def test_unknown_kernel_version_is_refused_with_the_choices(bad):
    with pytest.raises(LabBuildError, match=r"choose a series \(7\.2, 7\.3\) or an exact release"):
        kernel.split_version(bad)
