//! A slot's queue, whose gauge is its length.

use std::collections::VecDeque;

use prometheus::IntGauge;

/// A slot's queue, keeping its gauge equal to its length: every insertion adds one,
/// every removal (including the drop) takes one away.
pub(super) struct Queue<T> {
    items: VecDeque<T>,
    gauge: IntGauge,
}

impl<T> Queue<T> {
    pub(super) fn new(gauge: IntGauge) -> Queue<T> {
        Queue {
            items: VecDeque::new(),
            gauge,
        }
    }

    pub(super) fn push_back(&mut self, item: T) {
        self.gauge.inc();
        self.items.push_back(item);
    }

    pub(super) fn push_front(&mut self, item: T) {
        self.gauge.inc();
        self.items.push_front(item);
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.gauge.dec();
        Some(item)
    }

    pub(super) fn pop_back(&mut self) -> Option<T> {
        let item = self.items.pop_back()?;
        self.gauge.dec();
        Some(item)
    }

    /// Removes the first item if `condition` holds for it.
    pub(super) fn pop_front_if(&mut self, condition: impl FnOnce(&T) -> bool) -> Option<T> {
        if self.items.front().is_some_and(condition) {
            self.pop_front()
        } else {
            None
        }
    }

    pub(super) fn front(&self) -> Option<&T> {
        self.items.front()
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.items.iter_mut()
    }

    /// Empties the queue, in order.
    pub(super) fn take_all(&mut self) -> Vec<T> {
        self.gauge.sub(self.items.len() as i64);
        self.items.drain(..).collect()
    }
}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        self.gauge.sub(self.items.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_is_the_length_through_every_change_and_the_drop() {
        let gauge = IntGauge::new("waiting", "test").unwrap();
        let mut queue = Queue::new(gauge.clone());
        queue.push_back(2);
        queue.push_back(3);
        queue.push_front(1);
        assert_eq!(gauge.get(), 3);
        assert_eq!(queue.pop_front_if(|n| *n == 2), None);
        assert_eq!(queue.pop_front_if(|n| *n == 1), Some(1));
        assert_eq!(queue.front(), Some(&2));
        assert_eq!((queue.len(), gauge.get()), (2, 2));
        queue.iter_mut().for_each(|n| *n *= 10);
        assert_eq!(queue.pop_back(), Some(30));
        queue.push_back(40);
        assert_eq!(queue.take_all(), [20, 40]);
        assert!(queue.is_empty());
        assert_eq!(gauge.get(), 0);
        queue.push_back(5);
        queue.push_back(6);
        assert_eq!(gauge.get(), 2);
        drop(queue);
        assert_eq!(gauge.get(), 0, "what a dropped queue held is gone too");
    }
}
