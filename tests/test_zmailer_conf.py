"""zmailer.conf is read by two programs of this repository: zmsmtpd.py
(ZEnv) and contrib/rauth (read_zconfig).  Both follow the sh rule the
ZMailer scripts follow when they source the file, and this one table of
cases holds them to it."""

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import tempfile
import unittest

from tests.harness import HERE, write_file
import zmsmtpd

#: (file text, variable, value a shell would give it)
SHELL_CASES = [
    ("A=/x\nB=$A/y\n", "B", "/x/y"),
    ("A=/x\nB=${A}/y\n", "B", "/x/y"),
    ("B=${ZMTEST_UNSET:-/def}/z\n", "B", "/def/z"),
    ("A=/x\nB=${A:-/def}\n", "B", "/x"),
    ("A=\nB=${A:-/def}\n", "B", "/def"),
    ("A=\nB=${A-/def}\n", "B", ""),
    ("B=${ZMTEST_UNSET-/def}\n", "B", "/def"),
    ("B=${ZMTEST_UNSET:=/set}\nC=$ZMTEST_UNSET\n", "C", "/set"),
    ("A=/x\nB=${A:+alt}\n", "B", "alt"),
    ("B=${ZMTEST_UNSET:+alt}\n", "B", ""),
    ("A=/x\nB=${ZMTEST_UNSET:-$A/d}\n", "B", "/x/d"),
    ('B="${ZMTEST_UNSET:-a b}"\n', "B", "a b"),
    ("B='$A'\n", "B", "$A"),
    ('SMTPOPTIONS="-s ve -l x"\n', "SMTPOPTIONS", "-s ve -l x"),
    ("A=/a\nA=/b\n", "A", "/b"),
    ("export A=/e\n", "A", "/e"),
    ("A=/x # comment\n", "A", "/x"),
]


def load_rauth():
    """contrib/rauth as a module (it has no .py suffix)."""
    path = os.path.join(HERE, "contrib", "rauth")
    loader = importlib.machinery.SourceFileLoader("rauth_under_test", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class TestZmailerConfIsReadAsShWouldSourceIt(unittest.TestCase):
    """One rule for both readers of zmailer.conf."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zmconf-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.environ.pop("ZMTEST_UNSET", None)
        self.rauth = load_rauth()

    def write(self, text):
        return write_file(os.path.join(self.dir, "zmailer.conf"), text)

    def test_zmsmtpd_expands_every_case_as_sh_does(self):
        for text, name, value in SHELL_CASES:
            with self.subTest(text=text):
                self.assertEqual(zmsmtpd.ZEnv.load(self.write(text)).get(name), value)

    def test_rauth_expands_every_case_as_sh_does(self):
        for text, name, value in SHELL_CASES:
            with self.subTest(text=text):
                self.assertEqual(self.rauth.read_zconfig(self.write(text), {}).get(name), value)

    def test_a_real_shell_agrees_with_the_table(self):
        sh = shutil.which("sh")
        if not sh:
            self.skipTest("no sh installed")
        for text, name, value in SHELL_CASES:
            with self.subTest(text=text):
                path = self.write(text)
                out = subprocess.check_output(
                    [sh, "-c", '. "$1"; printf %s "$' + name + '"', "sh", path],
                    env={"PATH": os.environ.get("PATH", "/bin:/usr/bin")})
                self.assertEqual(out.decode(), value)
