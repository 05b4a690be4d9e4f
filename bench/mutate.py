#!/usr/bin/env python3
"""Replaces COUNT existing files of a tree with new random content: mutate.py TREE [options].

The files are chosen at random (with --seed) among regular files of 512 KiB to 8 MiB that
have a single link; each gets BYTES/COUNT bytes of random data written in place (same inode,
owner and mode; the mtime becomes now). Prints the changed paths, NUL-terminated, on stdout,
and the total on stderr.
"""

import argparse
import os
import random
import stat
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--bytes", type=int, default=50 * 1024 * 1024, help="total new content")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    root = os.fsencode(args.tree)
    candidates = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and 512 << 10 <= st.st_size <= 8 << 20:
                candidates.append(p)
    candidates.sort()
    if len(candidates) < args.count:
        print(f"mutate.py: only {len(candidates)} candidate files in {args.tree}", file=sys.stderr)
        return 1
    rng = random.Random(args.seed)
    chosen = rng.sample(candidates, args.count)
    each = args.bytes // args.count
    for p in chosen:
        with open(p, "r+b") as f:
            f.truncate(0)
            f.write(os.urandom(each))
        sys.stdout.buffer.write(p + b"\0")
    print(f"mutate.py: replaced {args.count} files with {each * args.count} bytes of random data",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
