package hook

import (
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/internal/testwait"
)

// TestCrewReusesIdleGoroutines: work spawned while a goroutine of the
// crew is idle runs on it; work spawned while every one is busy starts
// another at once (spawn never waits); idle goroutines end after idleFor;
// stop ends the idle ones and waits for the busy ones.
func TestCrewReusesIdleGoroutines(t *testing.T) {
	c := newCrew()
	c.idleFor = time.Minute
	defer c.stop()

	ran := make(chan int, 4)
	if !c.spawn(func() { ran <- 1 }) {
		t.Fatal("spawn refused")
	}
	<-ran
	testwait.For(t, 5*time.Second, "the goroutine idle", func() bool { return c.idle.Load() == 1 })
	c.spawn(func() { ran <- 2 })
	<-ran
	if n := c.started.Load(); n != 1 {
		t.Fatalf("%d goroutines started for two jobs one after the other, want 1 (reused)", n)
	}

	// A job that blocks: the next one gets a goroutine of its own at once.
	testwait.For(t, 5*time.Second, "the goroutine idle again", func() bool { return c.idle.Load() == 1 })
	release := make(chan struct{})
	c.spawn(func() { <-release; ran <- 3 })
	c.spawn(func() { ran <- 4 })
	if got := <-ran; got != 4 {
		t.Fatalf("job %d finished first, want 4: spawn waited for a busy goroutine", got)
	}
	if n := c.started.Load(); n != 2 {
		t.Fatalf("%d goroutines started, want 2", n)
	}
	close(release)
	<-ran

	c.stop()
	if n := c.live.Load(); n != 0 {
		t.Fatalf("%d goroutines of the crew left after stop", n)
	}
	if c.spawn(func() {}) {
		t.Fatal("spawn accepted after stop")
	}
}

// TestCrewIdleGoroutinesEnd: an idle goroutine ends after idleFor.
func TestCrewIdleGoroutinesEnd(t *testing.T) {
	c := newCrew()
	c.idleFor = 10 * time.Millisecond
	defer c.stop()
	for range 3 {
		c.spawn(func() {})
	}
	testwait.For(t, 5*time.Second, "idle goroutines ended", func() bool { return c.live.Load() == 0 })
}
