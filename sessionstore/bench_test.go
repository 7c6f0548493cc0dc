package sessionstore

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// BenchmarkQueueMessage is the store's cost of one QoS 1 message queued
// for a persistent session and acknowledged: OnQosPublish and
// OnQosComplete, two transactions (go test -bench QueueMessage ./sessionstore).
var syncEvery = time.Second

func BenchmarkQueueMessage(b *testing.B) {
	for _, sync := range []bool{false, true} {
		name := "fsync every second"
		if sync {
			name = "fsync every commit"
		}
		b.Run(name, func(b *testing.B) {
			server := mqtt.New(&mqtt.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			h, err := Open(filepath.Join(b.TempDir(), "sessions.db"), Options{MasterKey: bytes.Repeat([]byte{1}, MasterKeySize),
				Server: server, SyncCommits: sync, SyncEvery: syncEvery, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer h.Close()
			cl := server.NewClient(nil, "tcp", "A00MS8011390002S", false)
			cl.Properties.ProtocolVersion = 4
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "m2m/A00MS8011390002S/down/cmd",
				Payload: []byte("set 21.5"), Created: 1}
			ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}}
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				pk.PacketID = uint16(i%60000 + 1)
				ack.PacketID = pk.PacketID
				h.OnQosPublish(cl, pk, 0, 0)
				h.OnQosComplete(cl, ack)
			}
			if h.Stats().WriteErrors != 0 {
				b.Fatal("write errors")
			}
		})
	}
}

// BenchmarkQueueMessageParallel: the same from 8 goroutines at once, each
// for a session of its own, as mochi's client goroutines do.
func BenchmarkQueueMessageParallel(b *testing.B) {
	server := mqtt.New(&mqtt.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	h, err := Open(filepath.Join(b.TempDir(), "sessions.db"), Options{MasterKey: bytes.Repeat([]byte{1}, MasterKeySize),
		Server: server, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	var n atomic.Int64
	b.SetParallelism(4)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		id := fmt.Sprintf("T%d", n.Add(1))
		cl := server.NewClient(nil, "tcp", id, false)
		cl.Properties.ProtocolVersion = 4
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "m2m/" + id + "/down/cmd",
			Payload: []byte("set 21.5"), Created: 1}
		ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}}
		for i := 0; pb.Next(); i++ {
			pk.PacketID = uint16(i%60000 + 1)
			ack.PacketID = pk.PacketID
			h.OnQosPublish(cl, pk, 0, 0)
			h.OnQosComplete(cl, ack)
		}
	})
}
