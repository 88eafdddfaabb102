"""Faults planted into C-MAPSS text lines, shared by the ingest property tests."""

from __future__ import annotations

import cmapss_names as CM


def plant_faults(lines: list[str], ops: list[tuple[str, int, int]], blank: str = "  ") -> list[str]:
    """Apply ``(op, i, j)`` faults to a copy of ``lines`` (``i`` picks the line, ``j`` the variant).

    Ops: ``drop_field``, ``string``, ``dup``, ``swap``, ``range``, ``nan``, ``sentinel``, ``truncate``,
    ``extra``, ``blank`` (the line becomes ``blank``), ``spaces`` (odd whitespace around fields) and
    ``stuck`` (a varying channel frozen over a run longer than the stuck window). An op that needs
    fields does nothing on a line without enough of them.
    """
    out = list(lines)
    for op, i, j in ops:
        if not out:
            break
        i %= len(out)
        f = out[i].split()
        if op == "stuck":
            col = (6, 7, 8, 11, 15)[j % 5]
            value = f[col] if len(f) > col else "1590.00"
            for k in range(i, min(i + 22 + j % 6, len(out))):
                g = out[k].split()
                if len(g) > col:
                    g[col] = value
                    out[k] = " ".join(g)
        elif op == "drop_field" and len(f) > 1:
            del f[j % len(f)]
            out[i] = " ".join(f)
        elif op == "dup":
            out.insert(j % (len(out) + 1), out[i])
        elif op == "swap":
            k = j % len(out)
            out[i], out[k] = out[k], out[i]
        elif op == "range" and len(f) > 2:
            f[2 + j % (len(f) - 2)] = "1e9"
            out[i] = " ".join(f)
        elif op == "nan" and len(f) > 2:
            f[2 + j % (len(f) - 2)] = "NaN"
            out[i] = " ".join(f)
        elif op == "sentinel" and len(f) > 2:
            f[2 + j % (len(f) - 2)] = str(CM.SENTINELS[0])
            out[i] = " ".join(f)
        elif op == "string" and f:
            f[j % len(f)] = "x" + str(j)
            out[i] = " ".join(f)
        elif op == "truncate":
            out[i] = out[i][: j % max(len(out[i]), 1)]
        elif op == "extra":
            out[i] = out[i] + " 1.0"
        elif op == "blank":
            out[i] = blank
        elif op == "spaces":
            out[i] = "  " + out[i].replace(" ", "\t  ") + "   "
    return out
