"""Judging a plan: the discrete-event simulator that predicts a plan's step time and the
validator that checks a plan against its cluster and model (memory, coverage, shares).

Role: pure functions of a plan and its inputs. May import ``core`` and ``inputs``; must not
import ``passes``, ``api`` or ``cli``.
"""
