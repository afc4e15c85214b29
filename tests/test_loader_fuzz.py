"""Fuzz the artifact loader with corrupted bytes: every corruption is refused with ArtifactError
(never a crash of the process, never a silently wrong load)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shiftadd_tvm
from shiftadd_tvm.errors import ArtifactError

mutation = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("truncate"), st.floats(0, 0.9999)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16))),
    st.tuples(
        st.just("tail"),
        st.lists(st.tuples(st.integers(1, 200), st.integers(1, 255)), min_size=1, max_size=3),
    ),
)


def apply(data: bytes, mut) -> bytes:
    kind, arg = mut
    d = bytearray(data)
    if kind == "flip":
        for pos, xor in arg:
            d[min(int(pos * len(d)), len(d) - 1)] ^= xor
    elif kind == "truncate":
        d = d[: int(arg * len(d))]
    elif kind == "append":
        d += arg
    elif kind == "insert":
        pos, blob = arg
        i = int(pos * len(d))
        d[i:i] = blob
    elif kind == "tail":  # hit the manifest and trailer, where a corruption is most tempting
        for back, xor in arg:
            d[len(d) - back] ^= xor
    return bytes(d)


@pytest.fixture(scope="module")
def artifact_bytes(tiny_artifact):
    return tiny_artifact[1].read_bytes()


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mut=mutation)
def test_corrupted_artifact_is_refused(artifact_bytes, tmp_path_factory, mut):
    data = apply(artifact_bytes, mut)
    path = tmp_path_factory.mktemp("fuzz") / "a.so"
    path.write_bytes(data)
    if data == artifact_bytes:
        shiftadd_tvm.runtime.load(path)
        return
    with pytest.raises(ArtifactError):
        shiftadd_tvm.runtime.load(path)
