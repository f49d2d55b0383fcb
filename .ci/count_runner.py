"""Run unittest modules verbosely and write machine-readable counts.

Usage: python .ci/count_runner.py COUNTS_FILE [MODULE...]

Without MODULE arguments the names come from the environment variable
COUNT_RUNNER_MODULES (blank-separated).  .ci/test uses that, so that the
runner's command line does not contain "zmsmtpd": tests that check how
zmsmtpd recognises a previous daemon by its command line must not mistake
the test runner for one.

The verbose unittest report goes to stderr as usual.  When the run is over,
COUNTS_FILE gets one line:

    run=N passed=N failed=N errors=N skipped=N xfail=N xpass=N

passed = run - failed - errors - skipped - xpass, counting each test method
once however many of its subTests failed (expected failures count as passed;
unexpected successes count as failures in the summary).  A module
that cannot be imported shows up as an error.  Exit status 0 when nothing
failed, 1 otherwise.  Works on CPython 3.6 and later, stdlib only.
"""

import os
import sys
import unittest


def main(argv):
    if len(argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    counts_file = argv[1]
    modules = argv[2:] or os.environ.get("COUNT_RUNNER_MODULES", "").split()
    if not modules:
        sys.stderr.write("count_runner: no test modules given\n")
        return 2
    sys.path.insert(0, os.getcwd())
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in modules:
        suite.addTests(loader.loadTestsFromName(name))
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stderr).run(suite)
    run = result.testsRun

    def ids(pairs):
        # A failing subTest is reported once per subtest; count each test
        # method once.
        out = set()
        for test, _ in pairs:
            out.add(getattr(test, "test_case", test).id())
        return out

    failed_ids = ids(result.failures)
    error_ids = ids(result.errors) - failed_ids
    skipped_ids = ids(result.skipped) - failed_ids - error_ids
    failed, errors, skipped = len(failed_ids), len(error_ids), len(skipped_ids)
    xfail = len(result.expectedFailures)
    xpass = len(result.unexpectedSuccesses)
    # Errors outside any test (setUpClass, module fixtures) are not in
    # testsRun; keep "passed" from going negative.
    passed = max(0, run - failed - errors - skipped - xpass)
    line = "run=%d passed=%d failed=%d errors=%d skipped=%d xfail=%d xpass=%d\n" % (
        run, passed, failed, errors, skipped, xfail, xpass)
    tmp = counts_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(line)
    os.rename(tmp, counts_file)
    return 0 if failed + errors + xpass == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
