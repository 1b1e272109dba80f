"""Atelier: specialist small language models from a team's documents, behind one orchestrator.

This root package only assembles the command line (`atelier.cli`) and holds what every
package shares: the home directory, atomic writes and the domain error type. It must stay
light: importing it never imports torch.
"""

__version__ = "0.1.0"
