"""The compile report: per-device memory from XLA's accounting and the collectives of the compiled HLO, on 8 fake
CPU devices."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from qwen3next_jax.sharding import make_mesh
from qwen3next_train.compile_report import COLLECTIVES, compile_report, count_collectives, format_compile_report


def test_each_collective_of_a_sharded_step_is_counted():
    mesh = make_mesh(data=-1)
    n = mesh.shape["data"]

    def per_device(x):  # one of each: all-reduce, all-gather, collective-permute, all-to-all
        total = jax.lax.psum(x, "data")
        gathered = jax.lax.all_gather(x, "data", tiled=True)
        shifted = jax.lax.ppermute(x, "data", [(i, (i + 1) % n) for i in range(n)])
        swapped = jax.lax.all_to_all(x, "data", 0, 0, tiled=True)
        return total + shifted + swapped, gathered

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P("data"))))
    x = jax.ShapeDtypeStruct((8 * n, 16), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    compiled = step.lower(x).compile()
    report = compile_report(compiled)
    counts = report["collectives"]
    assert {k: counts[k] for k in ("all-reduce", "all-gather", "collective-permute", "all-to-all")} == {
        "all-reduce": 1, "all-gather": 1, "collective-permute": 1, "all-to-all": 1}
    assert counts["reduce-scatter"] == counts["ragged-all-to-all"] == 0
    # Memory per device: the argument is one shard of x, 8 rows of 16 floats.
    analysis = compiled.memory_analysis()
    assert report["memory"]["arguments"] == analysis.argument_size_in_bytes == 8 * 16 * 4
    assert report["memory"]["outputs"] == analysis.output_size_in_bytes > 0
    assert report["memory"]["temporaries"] == analysis.temp_size_in_bytes
    line = format_compile_report(report)
    assert "arguments 512 B" in line and "all-to-all 1" in line and "reduce-scatter" not in line


def test_a_step_without_communication_reports_none():
    mesh = make_mesh(data=-1)
    x = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    compiled = jax.jit(lambda a: a * 2 + 1).lower(x).compile()
    assert set(compile_report(compiled)["collectives"].values()) == {0}
    assert format_compile_report(compile_report(compiled)).endswith("collectives: none")


def test_hlo_opcodes_not_names():
    """Asynchronous pairs count once; an instruction's name is not its opcode; ragged-all-to-all is not all-to-all."""
    hlo = """
      %all-gather-start.1 = (f32[2]{0}, f32[16]{0}) all-gather-start(f32[2]{0} %p), dimensions={0}
      %all-gather-done.1 = f32[16]{0} all-gather-done((f32[2]{0}, f32[16]{0}) %all-gather-start.1)
      %x = f32[16]{0} ragged-all-to-all(f32[16]{0} %a, f32[16]{0} %b, s64[8]{0} %c, s64[8]{0} %d)
      %all-to-all.2 = f32[16]{0} add(f32[16]{0} %all-gather-done.1, f32[16]{0} %x)
    """
    counts = count_collectives(hlo)
    assert counts == {**dict.fromkeys(COLLECTIVES, 0), "all-gather": 1, "ragged-all-to-all": 1}


def test_collective_bytes_count_loop_trips_and_whole_buffers():
    """Per collective the larger of what it reads and writes (operand shapes from their definitions or inline; an
    async start's echo of its operand left out; for a ragged-all-to-all the smaller of its input and its result),
    times the trips of the loops it runs in, nested loops multiplied."""
    hlo = """
%inner (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %rs = f32[2]{0} reduce-scatter(%p), dimensions={0}, to_apply=%add
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0:T(128)} get-tuple-element(%t), index=1
  %ag = (f32[2]{0:T(128)}, f32[8]{0:T(128)}) all-gather-start(f32[2]{0:T(128)} %y), dimensions={0}
  %w = f32[8]{0} while(%t), condition=%cond, body=%inner, backend_config={"known_trip_count":{"n":"5"}}
}

ENTRY %main (a: bf16[4,16]) -> f32[8] {
  %a = bf16[4,16]{1,0} parameter(0)
  %buf = bf16[64,16]{1,0} broadcast(%z)
  %r = bf16[64,16]{1,0} ragged-all-to-all(%a, %buf, %o, %s, %o2, %s2), channel_id=1
  %ar = (f32[3]{0}, bf16[2,2]{1,0}) all-reduce(%u, %v), to_apply=%add
  %loop = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %open = (s32[], f32[8]) while(%init), condition=%cond, body=%cond
}
"""
    from qwen3next_train.compile_report import collective_bytes

    report = collective_bytes(hlo)
    assert report["executed"] == {**dict.fromkeys(COLLECTIVES, 0), "all-gather": 3, "reduce-scatter": 15,
                                  "ragged-all-to-all": 1, "all-reduce": 1}
    assert report["bytes"] == {**dict.fromkeys(COLLECTIVES, 0), "all-gather": 3 * 32, "reduce-scatter": 15 * 32,
                               "ragged-all-to-all": 4 * 16 * 2, "all-reduce": 12 + 8}
    assert report["loops_without_trip_count"] == 1


def test_hlo_flops_count_dots_convolutions_kernels_and_loop_trips():
    """2 FLOPs per multiply-add of a dot (its contracting dims) and of a convolution (the kernel less its output
    features), a kernel's own cost estimate, each times its loop's trips: XLA's known trip count or, without one,
    the bound of the loop condition's `i < constant`."""
    hlo = """
%cond (c: (s32[], f32[8,4])) -> pred[] {
  %c = (s32[], f32[8,4]{1,0}) parameter(0)
  %n = s32[]{:T(128)} constant(6)
  %i = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (b: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %b = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%b), index=1
  %w = bf16[4,4]{1,0:T(8,128)(2,1)} constant({...})
  %conv = f32[8,4]{1,0} convolution(%x, %w), dim_labels=bf_io->bf
  %gmm = f32[8,4]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="ragged-dot-none"}, backend_config={"custom_call_config":{"cost_estimate":{"flops":"100","bytes_accessed":"1"}}}
  %pallas = f32[8,4]{1,0} custom-call(%x), custom_call_target="tpu_custom_call"
}

ENTRY %main (a: f32[2,3,5]) -> f32[2,3,7] {
  %a = f32[2,3,5]{2,1,0} parameter(0)
  %m = f32[5,7]{1,0} parameter(1)
  %d = f32[2,3,7]{2,1,0} dot(%a, %m), lhs_contracting_dims={2}, rhs_contracting_dims={0}
  %loop = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body
}
"""
    from qwen3next_train.compile_report import hlo_flops

    dot, conv, gmm = 2 * 2 * 3 * 7 * 5, 2 * 8 * 4 * 4, 100
    assert hlo_flops(hlo) == {"flops": dot + 6 * (conv + gmm), "flops_once": dot + conv + gmm,
                              "grouped_matmul_flops": 6 * gmm, "kernels_without_estimate": 1,
                              "loops_without_trip_count": 0}
