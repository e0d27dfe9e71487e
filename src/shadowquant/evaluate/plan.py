"""What a config sweeps, decided while the Snakefile is parsed (torch-free): the points, their groups
of jobs, the breakdown point, which statistics need a sensitivity ranking or MSE clip scales, and the
exported point. The workflow (common.smk) only names these values; the logic lives here, where a unit
test reaches it."""

from __future__ import annotations

from dataclasses import dataclass

from shadowquant.runtimes import Runtime, get_runtime
from shadowquant.runtimes.decision import needs_ranking, parse_point, point_clip


@dataclass(frozen=True)
class SweepPlan:
    runtime: Runtime
    export_point: str  # a point label, or "auto": the selection's choice
    labels: list[str]  # every sweep point, in file order
    points_per_job: int
    breakdown_statistic: str
    breakdown_point: str  # the "all" bar of the error breakdown, itself a sweep point

    @property
    def export_is_auto(self) -> bool:
        return self.export_point == "auto"

    @property
    def export_threshold(self) -> float | None:
        """The threshold of an explicit ratio point (the outlier plot marks it); None otherwise."""
        if self.export_is_auto:
            return None
        _, rule, value = parse_point(self.export_point)
        return value if rule == "ratio" else None

    @property
    def point_groups(self) -> list[list[str]]:
        """The points in groups of sweep.points_per_job, each evaluated by one job with one model load."""
        step = self.points_per_job
        return [self.labels[i : i + step] for i in range(0, len(self.labels), step)]

    @property
    def group_of_point(self) -> dict[str, int]:
        return {label: g for g, group in enumerate(self.point_groups) for label in group}

    @property
    def sensitivity_statistics(self) -> list[str]:
        """Statistics whose sensitivity ranking some point needs (measured once per statistic)."""
        return sorted({parse_point(label)[0] for label in self.labels if needs_ranking(label)})

    @property
    def clip_statistics(self) -> list[str]:
        """Statistics of the '-mse' points: their MSE clip scales are measured."""
        return sorted({parse_point(label)[0] for label in self.labels if point_clip(label) == "mse"})


def sweep_plan(config: dict) -> SweepPlan:
    """The plan of a validated config (defaults filled)."""
    runtime = get_runtime(config["runtime"]["profile"])
    statistic = runtime.breakdown_statistic(config["sweep"]["statistics"])
    export_point = config["export"]["point"]
    return SweepPlan(runtime=runtime, export_point=export_point,
                     labels=runtime.sweep_labels(config["sweep"], export_point),
                     points_per_job=config["sweep"]["points_per_job"], breakdown_statistic=statistic,
                     breakdown_point=runtime.breakdown_point(statistic))
