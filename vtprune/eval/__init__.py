from .lock import FolderBusy
from .records import ResultsFile
from .report import summarize
from .runner import Config, evaluate

__all__ = ["Config", "FolderBusy", "ResultsFile", "evaluate", "summarize"]
