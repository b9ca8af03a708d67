from .records import ResultsFile
from .report import summarize
from .runner import Config, evaluate

__all__ = ["Config", "ResultsFile", "evaluate", "summarize"]
