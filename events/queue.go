package events

import (
	"sync"
	"sync/atomic"
)

// DefaultQueueSize is the number of events a Queue holds by default.
const DefaultQueueSize = 4096

// QueueOptions configure a Queue. The zero value is useful.
type QueueOptions struct {
	// Size is how many events may wait; 0 = DefaultQueueSize. When that
	// many wait, further ones are dropped and counted (Stats).
	Size int
}

// Queue is a Sink that hands its events, in the order they came, to its
// handlers on one goroutine of its own. Emit never blocks: a full queue
// drops the event and counts it. A handler must be quick (an MQTT
// publish through mochi's inline client, or the Webhook's own bounded
// Emit): a slow one makes the queue drop, never the broker wait.
//
// NewQueue starts the goroutine; Close stops it and waits for it.
type Queue struct {
	ch       chan Event
	handlers []func(Event)
	stop     chan struct{}
	done     chan struct{}
	once     sync.Once

	emitted atomic.Uint64
	dropped atomic.Uint64
}

// QueueStats are a Queue's counters since it was created.
type QueueStats struct {
	Emitted uint64 // events handed to the handlers
	Dropped uint64 // events dropped because the queue was full (or closed)
}

// NewQueue returns a started Queue that hands each event to every handler
// in turn.
func NewQueue(opts QueueOptions, handlers ...func(Event)) *Queue {
	if opts.Size <= 0 {
		opts.Size = DefaultQueueSize
	}
	q := &Queue{
		ch:       make(chan Event, opts.Size),
		handlers: handlers,
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	go q.run()
	return q
}

// Emit queues e for the handlers, or drops it if the queue is full or
// closed. It never blocks.
func (q *Queue) Emit(e Event) {
	select {
	case <-q.stop:
		q.dropped.Add(1)
		return
	default:
	}
	select {
	case q.ch <- e:
	default:
		q.dropped.Add(1)
	}
}

// Stats returns the queue's counters.
func (q *Queue) Stats() QueueStats {
	return QueueStats{Emitted: q.emitted.Load(), Dropped: q.dropped.Load()}
}

// Close hands the events still queued to the handlers, stops the
// goroutine and waits for it. Events emitted afterwards are dropped. It is
// safe to call more than once.
func (q *Queue) Close() {
	q.once.Do(func() { close(q.stop) })
	<-q.done
}

func (q *Queue) run() {
	defer close(q.done)
	for {
		select {
		case e := <-q.ch:
			q.handle(e)
		case <-q.stop:
			for {
				select {
				case e := <-q.ch:
					q.handle(e)
				default:
					return
				}
			}
		}
	}
}

func (q *Queue) handle(e Event) {
	for _, h := range q.handlers {
		h(e)
	}
	q.emitted.Add(1)
}

// Publish is the signature of mochi's (*mqtt.Server).Publish.
type Publish func(topic string, payload []byte, retain bool, qos byte) error

// MQTTPublisher returns a Queue handler that publishes each event on its
// topic (Topic) through publish: pass mochi's server.Publish, whose inline
// client must be enabled. Events go out at QoS 1, not retained:
// applications with a persistent session get what was published while
// they were away. mochi runs the ACL for every recipient (only
// applications whose reach covers the topic receive it) and never blocks
// on a slow subscriber (it drops for that subscriber instead).
func MQTTPublisher(publish Publish) func(Event) {
	return func(e Event) {
		_ = publish(Topic(e.SN, e.Kind), e.Marshal(), false, 1) // mochi logs a failure itself
	}
}
