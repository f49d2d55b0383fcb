"""README is the administrator's manual: its table of contents matches its
sections, and the Quick start's commands work as written."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import HERE, free_port

SERVER = os.path.join(HERE, "zmsmtpd.py")


def readme():
    with open(os.path.join(HERE, "README")) as f:
        return f.read()


def headings(text):
    lines = text.splitlines()
    return [lines[i] for i in range(1, len(lines) - 1)
            if lines[i] and re.match(r"^-{4,}$", lines[i + 1])
            and len(lines[i + 1]) == len(lines[i])]


class TestReadmeContents(unittest.TestCase):

    def test_the_table_of_contents_lists_every_section_in_order(self):
        text = readme()
        contents = text.split("Contents\n--------\n", 1)[1].lstrip("\n").split("\n\n", 1)[0]
        toc = re.findall(r"^ ?\d+\. (.+)$", contents, re.M)
        self.assertEqual(toc, [h for h in headings(text) if h != "Contents"])

    def test_quick_start_comes_first_and_troubleshooting_is_there(self):
        sections = [h for h in headings(readme()) if h != "Contents"]
        self.assertEqual(sections[0], "Quick start")
        self.assertIn("Troubleshooting", sections)
        self.assertIn("Logs", sections)


class TestQuickStartCommands(unittest.TestCase):
    """The demo, moved to free ports as the Quick start says, takes the
    stdlib test message the Quick start gives."""

    def start_demo(self, directory):
        proc = subprocess.Popen([sys.executable, SERVER, "--demo", directory],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(lambda: (proc.poll() is None and proc.terminate(), proc.wait(),
                                 proc.stderr.close()))
        return proc

    def demo_layout(self):
        d = tempfile.mkdtemp(prefix="zmreadme-")
        self.addCleanup(shutil.rmtree, d, True)
        subprocess.check_call([sys.executable, "-c",
                               "import sys; sys.path.insert(0, %r); import zmsmtpd; "
                               "zmsmtpd.make_demo(%r)" % (HERE, d)])
        return d

    def move_ports(self, d, smtp, submit):
        conf = os.path.join(d, "smtpserver.conf")
        with open(conf) as f:
            text = f.read()
        # The two lines the Quick start tells an administrator to edit.
        self.assertIn("PARAM BindSmtp    [127.0.0.1] 2525", text)
        self.assertIn("PARAM BindSubmit  [127.0.0.1] 2587", text)
        with open(conf, "w") as f:
            f.write(text.replace("2525", str(smtp)).replace("2587", str(submit)))

    def test_the_stdlib_one_liner_delivers_a_message_to_the_demo(self):
        command = re.search(r"^    (python3 -c 'import smtplib.*')$", readme(), re.M).group(1)
        d = self.demo_layout()
        smtp, submit = free_port(), free_port()
        self.move_ports(d, smtp, submit)
        proc = self.start_demo(d)
        deadline = time.time() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", submit), timeout=1).close()
                break
            except OSError:
                self.assertIsNone(proc.poll(), "the demo exited")
                self.assertLess(time.time(), deadline, "the demo never listened")
                time.sleep(0.05)
        subprocess.check_call(["sh", "-c", command.replace("2587", str(submit))
                               .replace("python3", sys.executable, 1)])
        self.assertEqual(len(os.listdir(os.path.join(d, "postoffice", "router"))), 1)

    def test_a_taken_demo_port_stops_the_demo_with_the_documented_message(self):
        d = self.demo_layout()
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        smtp = busy.getsockname()[1]
        self.move_ports(d, smtp, free_port())
        proc = self.start_demo(d)
        self.assertEqual(proc.wait(30), 2)
        err = proc.stderr.read().decode()
        self.assertIn("cannot listen on 127.0.0.1 port %d (SMTP): Address already in use"
                      % smtp, err)
        self.assertIn("cannot listen on 127.0.0.1 port 2525 (SMTP): Address already in use",
                      readme().replace("\n  ", " ").replace("\n", " ").replace("  ", " "))
