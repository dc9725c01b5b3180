"""Print the lowest versions pyproject.toml declares, as pip constraints (`name==version`).

Every `name>=version` of the core dependencies and of the `train` extra becomes
`name==version`; jaxlib is pinned with jax. CI installs the test suite under these
constraints, so that the declared lower bounds are versions that are tested.
"""

import re
import sys
import tomllib
from pathlib import Path


def main() -> int:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    project = project["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["train"]
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?>=([0-9][0-9A-Za-z.]*)", requirement)
        if match is None:
            print(f"no lower bound of the form name>=version in {requirement!r}", file=sys.stderr)
            return 1
        pins[match.group(1).lower()] = match.group(3)
    pins["jaxlib"] = pins["jax"]
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
