"""Plan reuse (nodes/reuse.py): a loader node gets its last model back for the same plan, lets go of
it before loading a different one, and drops models of nodes a new prompt no longer has."""

from __future__ import annotations

import gc
import weakref

import helpers_models as hm
import pytest

pytestmark = pytest.mark.comfyui


class Model:  # a stand-in for a ModelPatcher: only identity and liveness matter here
    pass


@pytest.fixture
def reuse(pack):
    hm.import_submodules(pack, "nodes.reuse")
    mod = pack.nodes.reuse
    mod.forget()
    yield mod
    mod.forget()


def test_same_key_reuses_and_a_new_key_lets_go_before_loading(reuse):
    loads = []

    def load():
        loads.append(1)
        return Model(), f"report {len(loads)}"

    m1, r1, reused = reuse.load_or_reuse("7", ("file", "fp8", 1), load)
    assert not reused and r1 == "report 1"
    m2, r2, reused = reuse.load_or_reuse("7", ("file", "fp8", 1), load)
    assert reused and m2 is m1 and r2 == r1 and len(loads) == 1
    old = weakref.ref(m1)
    del m1, m2
    seen_alive = []

    def load_new():
        gc.collect()
        seen_alive.append(old() is not None)  # the node's old model is gone before the new load
        return Model(), "new"

    m3, _, reused = reuse.load_or_reuse("7", ("file", "fp8", 2), load_new)
    assert not reused and seen_alive == [False]
    # another node has its own entry
    m4, _, reused = reuse.load_or_reuse("9", ("file", "fp8", 2), load)
    assert not reused and m4 is not m3


def test_a_prompt_without_the_node_lets_go_of_its_model(reuse):
    m, _, _ = reuse.load_or_reuse("3", ("k",), lambda: (Model(), "r"))
    ref = weakref.ref(m)
    del m
    reuse.on_prompt({"prompt": {"3": {}, "4": {}}})
    gc.collect()
    assert ref() is not None  # still in the workflow: kept
    reuse.on_prompt({"prompt": {"4": {}}})
    gc.collect()
    assert ref() is None  # the node was removed: let go of
    m, _, _ = reuse.load_or_reuse("5", ("k",), lambda: (Model(), "r"))
    ref = weakref.ref(m)
    del m
    reuse.load_or_reuse("6", ("k",), lambda: (Model(), "r"), live_nodes={"6"})
    gc.collect()
    assert ref() is None  # pruned when another loader runs in a workflow without node 5


def test_no_node_id_or_no_key_always_loads(reuse):
    n = []

    def load():
        n.append(1)
        return Model(), "r"

    reuse.load_or_reuse(None, ("k",), load)
    reuse.load_or_reuse(None, ("k",), load)
    reuse.load_or_reuse("1", None, load)
    assert len(n) == 3
