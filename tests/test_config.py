"""Config keys of earlier versions keep working, with a deprecation warning, and mean what they meant."""

import pytest

from shadowquant.config import validate_config
from shadowquant.errors import PipelineError


def test_statistic_and_threshold_become_one_export_point(capsys):
    cfg = validate_config({"statistic": "signed", "export": {"threshold": 152}, "runtime": {"profile": "ideal"}},
                          source="old.yaml")
    assert cfg["export"]["point"] == "signed-t152" and "statistic" not in cfg and "threshold" not in cfg["export"]
    err = capsys.readouterr().err
    assert "warning: old.yaml: config keys 'statistic' and 'export.threshold' are deprecated; use export.point: " \
           "signed-t152" in err


def test_a_statistic_alone_restricts_the_sweep(capsys):
    cfg = validate_config({"statistic": "signed", "runtime": {"profile": "ideal"}})
    assert cfg["sweep"]["statistics"] == ["signed"] and cfg["export"]["point"] == "auto"
    assert "use sweep.statistics: [signed]" in capsys.readouterr().err


def test_max_accuracy_drop_becomes_the_budget(capsys):
    cfg = validate_config({"sweep": {"metric": "accuracy", "max_accuracy_drop": 0.02}})
    assert cfg["sweep"]["budget"] == 0.02 and "max_accuracy_drop" not in cfg["sweep"]
    assert "use sweep.budget" in capsys.readouterr().err


def test_today_keys_give_no_warning(capsys):
    cfg = validate_config({"export": {"point": "absmax-k15"}, "sweep": {"budget": 0.03},
                           "runtime": {"profile": "ideal"}})
    assert cfg["export"]["point"] == "absmax-k15" and capsys.readouterr().err == ""


@pytest.mark.parametrize("old,message", [
    ({"export": {"threshold": 8}}, "needs its statistic; set export.point to 'absmax-t8' or 'signed-t8'"),
    ({"statistic": "median"}, "config key 'statistic' = 'median' is not valid"),
    ({"statistic": "absmax", "export": {"threshold": "high"}}, "'export.threshold' = 'high' is not valid"),
])
def test_bad_deprecated_values_get_one_line(old, message):
    with pytest.raises(PipelineError, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate_config(old)
