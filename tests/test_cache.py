"""The shared on-disk cache: one process builds a file, the others of a distributed run wait and load it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lit_inversion.cache import temporary_name

BUILD = textwrap.dedent("""
    import sys, time
    import torch
    import lit_inversion.sipit.table as table
    from lit_inversion.models import load_model
    from lit_inversion.states import LayerProbe

    build, log = table._build_table, sys.argv[2]

    def logged(*args):
        with open(log, "a") as f:
            f.write("built\\n")
        time.sleep(1.0)  # a slow build: the other process must wait for it, not build its own
        return build(*args)

    table._build_table = logged
    with LayerProbe(load_model(sys.argv[1]), 2) as probe:
        torch.save(table.first_position_table(probe, [1]).float(), sys.argv[3])
""")


@pytest.mark.slow
def test_concurrent_processes_build_a_table_once(tmp_path, tiny_llama_dir):
    log, cache = tmp_path / "builds.log", tmp_path / "cache"
    env = dict(os.environ, LIT_INVERSION_CACHE=str(cache))  # empty: one of the two must build
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tiny_llama_dir), str(log), str(tmp_path / f"t{i}.pt")],
                              env=env) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["built"]
    assert torch.equal(torch.load(tmp_path / "t0.pt"), torch.load(tmp_path / "t1.pt"))
    assert not list((cache / "tables").glob("*.tmp-*"))


def test_temporary_names_never_collide(tmp_path):
    names = {temporary_name(tmp_path / "table.pt") for _ in range(100)}
    assert len(names) == 100 and all(n.parent == tmp_path for n in names)
