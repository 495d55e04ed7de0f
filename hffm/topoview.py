"""Text report and PNG drawing of a topology: positions, link rates, D2D links, heads and paths."""

from __future__ import annotations

from pathlib import Path

from hffm.costmodel import CostModel
from hffm.methods import RoundContext
from hffm.topology import Topology


def topology_report(topo: Topology, costs: CostModel, ctx: RoundContext) -> str:
    geo, b = costs.geo, costs.budget
    lines = [f"profile {costs.cost.profile}; {len(topo.edges)} edges, {len(topo.devices)} devices"]
    for e in topo.edges:
        sx, sy = geo.servers[e]
        lines.append(
            f"{e} at ({sx:.0f}, {sy:.0f}) m; cluster centre ({geo.centres[e][0]:.0f}, {geo.centres[e][1]:.0f})"
        )
        head = ctx.heads.get(e)
        for d in topo.cluster(e):
            x, y = geo.devices[d.id]
            mark = "  [head]" if d.id == head else ""
            lines.append(
                f"  {d.id} at ({x:.0f}, {y:.0f}) m, {geo.distance(d.id, e):.0f} m from {e}: "
                f"uplink {b.uplink_bps[d.id] / 1e6:.2f} Mb/s, downlink {b.downlink_bps[d.id] / 1e6:.2f} Mb/s{mark}"
            )
        g = costs.d2d_graph(e)
        for u, v in sorted({tuple(sorted(x)) for x in g.edges()}):
            lines.append(
                f"  d2d {u} <-> {v}: {geo.distance(u, v):.0f} m, "
                f"{b.d2d_bps[(u, v)] / 1e6:.2f} / {b.d2d_bps[(v, u)] / 1e6:.2f} Mb/s"
            )
        for d in topo.cluster(e):
            if head and d.id != head:
                lines.append(f"  path {d.id} -> head: {' -> '.join(ctx.up_paths[d.id])}")
    return "\n".join(lines)


def draw_topology(topo: Topology, costs: CostModel, ctx: RoundContext, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    geo = costs.geo
    fig, (ax, axz) = plt.subplots(1, 2, figsize=(13, 6))
    for e in topo.edges:
        sx, sy = geo.servers[e]
        ax.scatter([sx], [sy], marker="s", s=60, color="tab:blue")
        ax.annotate(e, (sx, sy), fontsize=7)
        for d in topo.cluster(e):
            x, y = geo.devices[d.id]
            ax.plot([sx, x], [sy, y], color="tab:blue", alpha=0.15, lw=0.8)
            is_head = ctx.heads.get(e) == d.id
            ax.scatter(
                [x],
                [y],
                marker="*" if is_head else "o",
                s=80 if is_head else 15,
                color="tab:red" if is_head else "tab:orange",
            )
    ax.set_aspect("equal", "box")
    ax.set_title("edge servers (squares), devices (dots), cluster heads (stars)")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    # zoom on the first cluster: D2D links and the paths to its head
    e0 = topo.edges[0]
    g = costs.d2d_graph(e0)
    for u, v in g.edges():
        (x1, y1), (x2, y2) = geo.devices[u], geo.devices[v]
        axz.plot([x1, x2], [y1, y2], color="grey", lw=0.8)
    for d in topo.cluster(e0):
        p = ctx.up_paths.get(d.id, [])
        for a, b in zip(p, p[1:], strict=False):
            (x1, y1), (x2, y2) = geo.devices[a], geo.devices[b]
            axz.annotate("", (x2, y2), (x1, y1), arrowprops={"arrowstyle": "->", "color": "tab:red"})
        x, y = geo.devices[d.id]
        axz.scatter([x], [y], marker="*" if ctx.heads.get(e0) == d.id else "o", s=90, color="tab:orange")
        axz.annotate(d.id, (x, y), fontsize=8)
    axz.set_aspect("equal", "box")
    axz.set_title(f"{e0}: D2D links (grey), shortest paths to the head (red)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
