"""Every timm name of the supported families: built with timm's parameter shapes, or
rejected naming the timm option eqx_vision lacks; and the table of timm's configurations
(`models.json`) is what timm 1.0.31 gives."""

import gzip
import json
import re

import pytest

from eqx_vision.interop import timm as ev_timm
from timm_reference import FAMILIES, SHAPES, TABLE, check_shapes, models_table


SHAPE_TABLE = json.loads(gzip.decompress(SHAPES.read_bytes()))
NAMES = ev_timm.model_names(supported=False)

# Families whose every name must load, and the classic ViT configurations.
REQUIRED = re.compile(
    r"^(deit_|deit3_|cait_|pit_|twins_svt_|nest_|levit_|crossvit_"
    r"|vit_(tiny|small|base|large)_patch(8|14|16|32)_(224|384)(\.|$))"
)


def test_table_is_timms():
    """`models.json` is what `python tests/timm_reference.py` writes from timm 1.0.31."""
    assert json.loads(TABLE.read_text()) == json.loads(json.dumps(models_table()))


def test_shape_table_covers_every_name():
    assert set(SHAPE_TABLE["names"]) == set(NAMES)


def _status(name: str) -> str:
    """ "ok" if the name builds with timm's shapes, else the reason it is rejected."""
    try:
        signature = SHAPE_TABLE["names"][name]
        check_shapes(name, SHAPE_TABLE["configs"][signature])
    except ev_timm.TimmConfigError as e:
        return str(e)
    return "ok"


def _statuses(names: list[str]) -> dict[str, str]:
    """`_status` of each name; names of one configuration are checked once (a rejection
    then names the first of them)."""
    for name in names:
        signature = SHAPE_TABLE["names"][name]
        if signature not in _BY_SIGNATURE:
            _BY_SIGNATURE[signature] = _status(name)
    return {name: _BY_SIGNATURE[SHAPE_TABLE["names"][name]] for name in names}


_BY_SIGNATURE: dict[str, str] = {}  # the statuses found so far, shared by the tests


DOCS = TABLE.parents[4] / "docs" / "pretrained.md"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_name_loads_or_names_what_it_lacks(family):
    """Each name of the family builds with timm's shapes, or is rejected naming the option
    (never a required one); docs/pretrained.md gives the family's counts."""
    names = [n for n in NAMES if re.match(family.replace("*", ".*"), n)]
    assert names
    statuses = _statuses(names)
    for name, status in statuses.items():
        if REQUIRED.match(name):
            assert status == "ok", f"{name} must load: {status}"
        elif status != "ok":
            assert re.search(r"option|does not implement", status), status
    pretrained = [n for n in names if "." in n]
    loading = sum(statuses[n] == "ok" for n in pretrained)
    row = f"| `{family}` | {loading} | {len(pretrained)} |"
    assert row in DOCS.read_text(), f"docs/pretrained.md should have the row {row}"


def test_docs_total_row():
    rows = re.findall(r"^\| `[\w*]+` \| (\d+) \| (\d+) \|$", DOCS.read_text(), re.M)
    assert len(rows) == len(FAMILIES)
    loading, total = (sum(int(r[i]) for r in rows) for i in (0, 1))
    assert f"| all | {loading} | {total} |" in DOCS.read_text()
