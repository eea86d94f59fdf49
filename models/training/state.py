"""Where training stands (steps, epoch, position in the epoch): what a resume needs to continue exactly."""


class TrainState:
    """Where training stands; saved in every checkpoint's ``trainer_state.json``."""

    def __init__(self):
        self.completed_steps = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # batches of `epoch` already consumed

    def state_dict(self) -> dict:
        return {"completed_steps": self.completed_steps, "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.completed_steps = int(state["completed_steps"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])

