//! The dispatcher's lifecycle, which every task watches.

/// Where the dispatcher is in its life. Acceptors stop at `Stopping`. At `Finishing`
/// (every acceptor gone, so nothing new arrives) slots deliver what they can and return
/// what waits for a worker that is down, if the fd store can keep it. At `Abandon` (the
/// shutdown timeout) they return at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Phase {
    Running,
    Stopping,
    Finishing,
    Abandon,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks compare phases (`phase >= Phase::Finishing`): the order is the lifecycle's.
    #[test]
    fn phases_are_ordered_as_they_happen() {
        assert!(Phase::Running < Phase::Stopping);
        assert!(Phase::Stopping < Phase::Finishing);
        assert!(Phase::Finishing < Phase::Abandon);
    }
}
