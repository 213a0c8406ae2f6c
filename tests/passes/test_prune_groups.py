"""The pruning dependency analysis and what the pass does with it: the readable group listing, grouped-query
attention (written out as HF does, and through SDPA's enable_gqa), SwiGLU, the importance criteria, and the
errors (whole-group ratios, unknown ops, unprunable groups named explicitly, bad options).

Generated-model properties: test_prune_channels.py. HF models: test_prune_hf.py.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import PassError
from tests.harness import AttentionBlock, ResidualBlock, Sequence_, assert_equivalent


def prune(graph, spec: str, calibration=None):
    result = fxopt.Pipeline(spec, debug=True, calibration=calibration)(graph)
    return result.graph, next(iter(result.stats.values()))


class GQA(nn.Module):
    """Grouped-query attention: ``kv_heads`` key/value heads, each read by ``q_heads / kv_heads`` query heads."""

    def __init__(self, width=16, q_heads=6, kv_heads=2, head_dim=4, sdpa=False):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim, self.sdpa = q_heads, kv_heads, head_dim, sdpa
        self.q = nn.Linear(width, q_heads * head_dim)
        self.k, self.v = nn.Linear(width, kv_heads * head_dim), nn.Linear(width, kv_heads * head_dim)
        self.o = nn.Linear(q_heads * head_dim, width)

    def forward(self, x):
        b, n, _ = x.shape
        heads = lambda t, h: t.view(b, n, h, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x), self.q_heads), heads(self.k(x), self.kv_heads), heads(self.v(x), self.kv_heads)
        if self.sdpa:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # transformers' repeat_kv
            rep = self.q_heads // self.kv_heads
            k, v = (t[:, :, None].expand(b, self.kv_heads, rep, n, self.head_dim)
                    .reshape(b, self.q_heads, n, self.head_dim) for t in (k, v))
            context = torch.softmax(q @ k.transpose(2, 3) / self.head_dim ** 0.5, dim=-1) @ v
        return x + self.o(context.transpose(1, 2).reshape(b, n, -1))


def zero_query_heads(model: GQA, removed_heads) -> GQA:
    """``model`` with the output-projection columns of the given query heads zeroed."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for h in removed_heads:
            masked.o.weight[:, h * model.head_dim:(h + 1) * model.head_dim] = 0
    return masked


@pytest.fixture(scope="module")
def attention_graph():
    torch.manual_seed(0)
    model = Sequence_([AttentionBlock(8, 2, causal=True), ResidualBlock(8, 5, "gelu")]).eval()
    x = torch.randn(2, 3, 8)
    return model, fxopt.capture(model, (x,)), x


# ------------------------------------------------------------------ listing
def test_groups_list_heads_head_dims_ffn_and_the_fixed_stream(attention_graph):
    _, graph, _ = attention_graph
    groups = fxopt.prune.groups(graph)
    summary = {g.name: (g.kind, g.units, g.prunable) for g in groups}
    assert summary == {
        "heads:blocks.0.q": ("heads", 2, True), "head-dim:blocks.0.q": ("head-dim", 4, True),
        "head-dim:blocks.0.v": ("head-dim", 4, True), "ffn:blocks.1.up": ("ffn", 5, True),
        "hidden:blocks.0.out": ("hidden", 8, False),
    }
    heads = groups.by_name("heads:blocks.0.q")
    roles = {(m.target, m.axis): m.role for m in heads.members}
    assert roles == {(f"blocks.0.{p}.{t}", 0): "out" for p in "qkv" for t in ("weight", "bias")} | {
        ("blocks.0.out.weight", 1): "in"}
    assert heads.params_per_unit() == 4 * 4 * 8 + 3 * 4  # q, k, v rows and biases, out columns of a head
    text = str(groups)
    assert "#0 heads:blocks.0.q  2 units, 140 params each, prunable" in text
    assert "blocks.0.q.weight[0]  #0(2)x#1(4)" in text  # 8 q features = 2 heads x 4 dims
    assert "hidden:blocks.0.out  8 units" in text and "fixed: it is graph input %x; it is a graph output" in text


def test_prune_heads_and_prune_ffn_touch_only_their_kind(attention_graph):
    _, graph, _ = attention_graph
    _, heads = prune(graph, "prune-heads{ratio=0.5}")
    _, ffn = prune(graph, "prune-ffn{ratio=0.5}")
    assert set(heads["pruned"]) == {"heads:blocks.0.q"} and set(ffn["pruned"]) == {"ffn:blocks.1.up"}
    assert ffn["pruned"]["ffn:blocks.1.up"] == [3, 5]


def test_a_graph_without_prunable_groups_is_left_alone():
    x = torch.randn(2, 4)
    graph = fxopt.capture(nn.Linear(4, 3), (x,))
    pruned, stats = prune(graph, "prune-channels{ratio=0.5}")
    assert stats["pruned"] == {} and stats["fixed"] == {"ffn:weight": "fixed: it is a graph output"}
    assert torch.equal(pruned(x), graph(x))


# --------------------------------------------------------------------- GQA
@pytest.mark.parametrize("sdpa", [False, True])
def test_gqa_key_value_heads_go_with_the_query_heads_that_read_them(sdpa):
    torch.manual_seed(1)
    model, x = GQA(sdpa=sdpa).eval(), torch.randn(2, 5, 16)
    graph = fxopt.capture(model, (x,))
    groups = fxopt.prune.groups(graph)
    assert groups.by_name("heads:k").units == 2 and groups.by_name("query-heads:q").units == 3
    pruned, stats = prune(graph, "prune-heads{ratio=0.5}")
    (kept_kv,) = stats["kept"]["heads:k"]
    params = pruned.params()
    assert params["k.weight"].shape == (4, 16) and params["v.weight"].shape == (4, 16)
    assert params["q.weight"].shape == (12, 16) and params["o.weight"].shape == (16, 12)
    torch.testing.assert_close(params["k.weight"], model.k.weight[kept_kv * 4:(kept_kv + 1) * 4])
    removed_q = [h for h in range(6) if h // 3 != kept_kv]  # query head h reads key/value head h // 3
    assert_equivalent(zero_query_heads(model, removed_q), pruned, (x,))


@pytest.mark.parametrize("sdpa", [False, True])
def test_gqa_query_heads_within_each_group_are_pruned_alike(sdpa):
    torch.manual_seed(2)
    model, x = GQA(sdpa=sdpa).eval(), torch.randn(2, 5, 16)
    graph = fxopt.capture(model, (x,))
    pruned, stats = prune(graph, "prune-channels{ratio=0.34,kinds=query-heads}")
    kept = stats["kept"]["query-heads:q"]  # one of the 3 query heads of each group goes: floor(3 * 0.34) = 1
    assert stats["pruned"] == {"query-heads:q": [2, 3]} and len(kept) == 2
    removed_q = [g * 3 + r for g in range(2) for r in range(3) if r not in kept]
    assert pruned.params()["k.weight"].shape == (8, 16) and pruned.params()["q.weight"].shape == (16, 16)
    assert_equivalent(zero_query_heads(model, removed_q), pruned, (x,))


def test_pruned_head_dims_keep_sdpa_scale():
    """Removing query/key dims equals zeroing them, once SDPA's default scale 1/sqrt(E) is pinned to the old E."""
    torch.manual_seed(5)
    model, x = GQA(sdpa=True).eval(), torch.randn(2, 5, 16)
    graph = fxopt.capture(model, (x,))
    pruned, stats = prune(graph, "prune-channels{ratios=head-dim:k:0.5}")
    removed = sorted(set(range(4)) - set(stats["kept"]["head-dim:k"]))
    (sdpa,) = pruned.call_nodes(torch.ops.aten.scaled_dot_product_attention.default)
    assert sdpa.kwargs["scale"] == pytest.approx(0.5)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        rows = [h * 4 + d for h in range(6) for d in removed]
        masked.q.weight[rows] = 0
        masked.q.bias[rows] = 0
    assert_equivalent(masked, pruned, (x,))


# ------------------------------------------------------------- cat, split
class CatFFN(nn.Module):
    """Two up projections concatenated: the down projection's columns are one group after the other."""

    def __init__(self):
        super().__init__()
        self.up_a, self.up_b, self.down = nn.Linear(6, 4), nn.Linear(6, 8), nn.Linear(12, 6)

    def forward(self, x):
        return x + self.down(F.gelu(torch.cat([self.up_a(x), self.up_b(x)], dim=-1)))


class FusedGLU(nn.Module):
    """One up projection split in two halves multiplied together: unit u is rows u and u + 5 of ``up``."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 10), nn.Linear(5, 6)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * value)


def test_concatenated_and_split_projections_slice_at_their_offsets():
    torch.manual_seed(8)
    x = torch.randn(2, 3, 6)
    cases = ((CatFFN().eval(), lambda kept: kept["ffn:up_a"] + [4 + k for k in kept["ffn:up_b"]]),
             (FusedGLU().eval(), lambda kept: kept["ffn:up"]))
    for model, consumer_columns in cases:
        graph = fxopt.capture(model, (x,))
        pruned, stats = prune(graph, "prune-ffn{ratio=0.5}")
        kept_columns = consumer_columns(stats["kept"])
        masked = copy.deepcopy(model)
        with torch.no_grad():
            masked.down.weight[:, [c for c in range(masked.down.in_features) if c not in kept_columns]] = 0
        assert pruned.params()["down.weight"].shape == (6, len(kept_columns))
        assert_equivalent(masked, pruned, (x,))
    kept = stats["kept"]["ffn:up"]
    torch.testing.assert_close(pruned.params()["up.weight"], model.up.weight[kept + [5 + k for k in kept]])


# ------------------------------------------------------- grouped convolutions
class GroupedConvs(nn.Module):
    """conv 3->8, depthwise 8 (groups 8), grouped 1x1 8->8 (groups 2), 1x1 8->4, pooled."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.depthwise, self.bn_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.grouped, self.out = nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn_dw(self.depthwise(torch.relu(self.bn(self.conv(x))))))
        return self.out(torch.relu(self.grouped(x))).mean(dim=(2, 3))


def test_depthwise_and_grouped_convs_couple_channels_by_group():
    torch.manual_seed(7)
    model, x = GroupedConvs().eval(), torch.randn(2, 3, 6, 6)
    graph = fxopt.capture(model, (x,))
    groups = fxopt.prune.groups(graph)
    # conv and depthwise channels are (2 groups of the grouped conv) x (4 channels within a group)
    groups_of_2, per_in, per_out = (groups.by_name(n) for n in ("channels:conv", "channels:conv#2", "channels:grouped"))
    assert (groups_of_2.units, per_in.units, per_out.units) == (2, 4, 4)
    assert [g.name for g in groups if g.prunable] == ["channels:conv", "channels:conv#2", "channels:grouped"]
    assert {(m.target, m.axis) for m in per_in.members if m.role == "in"} == {("grouped.weight", 1)}
    pruned, stats = prune(graph, "prune-channels{ratio=0.5}")
    kept_group, kept_in, kept_out = (stats["kept"][g.name] for g in (groups_of_2, per_in, per_out))
    channels = [g * 4 + i for g in kept_group for i in kept_in]
    outputs = [g * 4 + o for g in kept_group for o in kept_out]
    params = pruned.params()
    assert params["depthwise.weight"].shape == (2, 1, 3, 3) and params["grouped.weight"].shape == (2, 2, 1, 1)
    torch.testing.assert_close(params["conv.weight"], model.conv.weight[channels])
    convs = {n.args[1].target: n for n in pruned.call_nodes(torch.ops.aten.conv2d.default)}
    depthwise, grouped = convs["depthwise.weight"], convs["grouped.weight"]
    assert (depthwise.args[6], grouped.args[6]) == (2, 1)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.out.weight[:, [c for c in range(8) if c not in outputs]] = 0
        for c in range(8):  # grouped output c reads input channels (c // 4) * 4 + j
            for j in range(4):
                if (c // 4) * 4 + j not in channels:
                    masked.grouped.weight[c, j] = 0
    assert_equivalent(masked, pruned, (x,))


# ------------------------------------------------------------------ SwiGLU
class SwiGLU(nn.Module):
    def __init__(self, width=8, hidden=12):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(width, hidden), nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.norm = nn.RMSNorm(width)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(self.norm(x))) * self.up(self.norm(x)))


def test_swiglu_gate_and_up_are_one_ffn_group_through_rms_norm():
    torch.manual_seed(3)
    model, x = SwiGLU().eval(), torch.randn(2, 3, 8)
    graph = fxopt.capture(model, (x,))
    (ffn,) = [g for g in fxopt.prune.groups(graph) if g.kind == "ffn"]
    assert {(m.target, m.role) for m in ffn.members if m.target.endswith("weight")} == {
        ("gate.weight", "out"), ("up.weight", "out"), ("down.weight", "in")}
    pruned, stats = prune(graph, "prune-ffn{ratio=0.25}")
    masked = copy.deepcopy(model)
    with torch.no_grad():
        dropped = sorted(set(range(12)) - set(stats["kept"][ffn.name]))
        masked.down.weight[:, dropped] = 0
    assert pruned.params()["up.weight"].shape == (9, 8)
    assert_equivalent(masked, pruned, (x,))


# ---------------------------------------------------------------- criteria
def ffn_with_a_dead_neuron():
    """Neuron 0 has the largest weights but its down-projection column is zero; neuron 1 has tiny weights."""
    torch.manual_seed(4)
    model = ResidualBlock(6, 4, "relu").eval()
    with torch.no_grad():
        model.up.weight[0] *= 10
        model.up.weight[1] *= 0.01
        model.down.weight[:, 1] *= 0.01
        model.down.weight[:, 0] = 0
    x = torch.randn(8, 3, 6)
    return model, x, fxopt.capture(model, (x,))


@pytest.mark.parametrize("criterion, dropped", [("l1", 1), ("l2", 1), ("taylor", 0), ("head", 0)])
def test_criteria_drop_the_least_important_neuron(criterion, dropped):
    model, x, graph = ffn_with_a_dead_neuron()
    pruned, stats = prune(graph, f"prune-ffn{{ratio=0.25,criterion={criterion}}}", calibration=[(x,)])
    assert stats["kept"]["ffn:up"] == [i for i in range(4) if i != dropped]
    if dropped == 0:  # the dead neuron never reached the output: pruning it changes nothing
        assert_equivalent(graph, pruned, (x,))


def test_global_scope_ranks_units_across_groups_of_a_kind():
    """Block 0's neurons are alike; block 1 has one strong neuron and three weak ones: the weak ones go first."""
    torch.manual_seed(6)
    model = Sequence_([ResidualBlock(6, 4, "relu"), ResidualBlock(6, 4, "relu")]).eval()
    with torch.no_grad():
        for block, scales in zip(model.blocks, ([1.0, 1.0, 1.0, 1.0], [1.0, 0.01, 0.01, 0.01])):
            block.up.weight.copy_(torch.ones(4, 6) * torch.tensor(scales)[:, None])
            block.down.weight.copy_(torch.ones(6, 4) * torch.tensor(scales))
            block.up.bias.zero_()
    x = torch.randn(2, 3, 6)
    graph = fxopt.capture(model, (x,))
    _, per_group = prune(graph, "prune-ffn{ratio=0.25}")
    _, pooled = prune(graph, "prune-ffn{ratio=0.25,scope=global}")
    assert per_group["pruned"] == {"ffn:blocks.0.up": [3, 4], "ffn:blocks.1.up": [3, 4]}
    assert pooled["pruned"] == {"ffn:blocks.1.up": [2, 4]}
    assert pooled["kept"]["ffn:blocks.1.up"] == [0, 1]  # the strong one, and of three tied weak ones the first
    _, most = prune(graph, "prune-ffn{ratio=0.75,scope=global}")  # 6 of 8 units: each group keeps one
    assert most["pruned"] == {"ffn:blocks.0.up": [1, 4], "ffn:blocks.1.up": [1, 4]}
    with pytest.raises(PassError, match=r"ratio 0.9 would remove every unit of some ffn group; use a smaller ratio"):
        prune(graph, "prune-ffn{ratio=0.9,scope=global}")


# ------------------------------------------------------------------ errors
class CumprodFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.down(torch.cumprod(self.up(x), dim=-1))


def test_errors_name_the_node_and_say_what_to_do(attention_graph):
    _, graph, _ = attention_graph
    with pytest.raises(PassError, match=r"prune-heads: node %linear \(aten.linear.default\): ratio 1.0 would remove "
                                        r"all 2 units of group heads:blocks.0.q; use a ratio below 1"):
        prune(graph, "prune-heads{ratio=1.0}")
    with pytest.raises(PassError, match=r"group hidden:blocks.0.out cannot be pruned \(fixed: it is graph input %x"):
        prune(graph, "prune-channels{ratios=hidden:.*:0.5}")
    with pytest.raises(PassError, match=r"ratios pattern 'nothing' matches no group; group names: heads:blocks.0.q"):
        prune(graph, "prune-channels{ratios=nothing:0.5}")
    with pytest.raises(PassError, match=r"criterion=taylor needs calibration data.*calibration=batches"):
        prune(graph, "prune-channels{ratio=0.5,criterion=taylor}")
    for spec, message in (("ratio=1.5", r"ratio=1.5 is outside \[0, 1\]"), ("criterion=l3", "unknown criterion"),
                          ("kinds=layers", "unknown group kinds"), ("ratios=heads", "is not pattern:ratio")):
        with pytest.raises(PassError, match=message):
            fxopt.Pipeline(f"prune-channels{{{spec}}}")


def test_an_unknown_op_on_a_selected_group_is_an_error_not_a_skip():
    x = torch.randn(2, 4)
    graph = fxopt.capture(CumprodFFN().eval(), (x,))
    assert "is an op the pruning analysis does not know" in str(fxopt.prune.groups(graph))
    with pytest.raises(PassError, match=r"prune-ffn: node %cumprod \(aten.cumprod.default\): the pruning analysis "
                                        r"does not know this op, and it touches group ffn:up; add a handler"):
        prune(graph, "prune-ffn{ratio=0.5}")
    pruned, stats = prune(graph, "prune-ffn{ratio=0.5,skip=ffn:up}")  # left out on purpose: nothing to prune
    assert not stats["pruned"] and torch.equal(pruned(x), graph(x))
