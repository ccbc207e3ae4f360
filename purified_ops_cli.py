"""The ``purified-ops`` command's entry point, kept outside the package on purpose.

An environment variable of purified_ops that holds a value it does not take makes
``import purified_ops`` raise ``SettingError``: a library must not run with another setting than
was asked for. The command imports the package too, so from inside the package it could only
crash with a traceback; from here it says what is wrong in one line and exits with status 2, as
it does for a bad argument."""
from __future__ import annotations

import sys


def _is_setting_error(error: BaseException) -> bool:
    # purified_ops._settings cannot be imported to name the class: importing it imports the package.
    return type(error).__name__ == "SettingError" and type(error).__module__ == "purified_ops._settings"


def main(argv=None) -> int:
    try:
        from purified_ops import cli
    except ValueError as error:
        if not _is_setting_error(error):
            raise
        print(f"purified-ops: error: {error}", file=sys.stderr)
        return 2
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
